"""Proposal files: both formats, clear errors, extraction and scoring with proposal scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import EvalConfig, ExtractConfig
from regionspot_cache.data.datasets import DatasetError, Manifest, load_coco_format
from regionspot_cache.data.proposals import GROUND_TRUTH, load_proposals, with_box_source
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.evaluate.cached import score_cache
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import HeadConfig, RegionSpotHead


def test_glip_and_coco_results_formats(tmp_path):
    glip = tmp_path / "glip.json"
    glip.write_text(json.dumps({"7": {"boxes": [[1, 2, 11, 22], [0, 0, 5, 5]], "scores": [0.9, 0.2], "labels": [3, 4]}}))
    boxes = load_proposals(glip)[7]
    np.testing.assert_array_equal(boxes.xyxy, [[1, 2, 11, 22], [0, 0, 5, 5]])
    np.testing.assert_allclose(boxes.scores, [0.9, 0.2])
    assert boxes.category_ids.tolist() == [-1, -1]
    coco = tmp_path / "coco.json"
    coco.write_text(
        json.dumps(
            [
                {"image_id": 7, "bbox": [1, 2, 10, 20], "score": 0.9, "category_id": 3},
                {"image_id": 8, "bbox": [0, 0, 5, 5], "score": 0.1, "category_id": 1},
            ]
        )
    )
    proposals = load_proposals(coco)
    np.testing.assert_array_equal(proposals[7].xyxy, [[1, 2, 11, 22]])
    assert sorted(proposals) == [7, 8]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"3": {"boxes": [[0, 0, 1, 1]], "scores": []}}', "image '3': 1 boxes but 0 scores"),
        ('{"x": {"boxes": [], "scores": []}}', "image 'x'"),
        ('[{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1}, {"image_id": 2}]', "result #1"),
        ('"text"', "expected a GLIP object"),
        ('{"1": ', "line 1 column"),
    ],
)
def test_malformed_proposal_files_name_file_and_position(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        load_proposals(path)
    assert "p.json" in str(info.value)


def test_extract_and_score_proposals(tmp_path, tiny_models, encoders):
    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=3, seed=9, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    glip = tmp_path / "glip.json"
    glip.write_text(
        json.dumps(
            {
                "1": {"boxes": [[0, 0, 30, 30], [10, 10, 60, 50]], "scores": [0.8, 0.5], "labels": [0, 0]},
                "3": {"boxes": [[5, 5, 20, 25]], "scores": [0.25], "labels": [0]},
            }
        )
    )
    manifest = Manifest("toy", annotations, tmp_path / "images", proposals={"glip": glip})
    with_proposals, source = with_box_source(dataset, manifest, "glip")
    assert source.startswith("proposals:glip.json:") and with_box_source(dataset, manifest, "gt")[1] == GROUND_TRUTH
    config = ExtractConfig(shard_size=2, num_workers=0, device="cpu")
    run_extraction(with_proposals, CacheTarget(tmp_path / "cache", box_source=source), encoders, config)
    reader = CacheReader(tmp_path / "cache")
    assert reader.provenance.box_source == source
    assert len(reader.image(1).boxes) == 2 and len(reader.image(2).boxes) == 0
    assert reader.status(2) == ("ok", "no boxes")
    np.testing.assert_allclose(reader.image(1).scores, [0.8, 0.5])
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim)).eval()
    detections = score_cache(reader, head, reader.vocabulary("toy"), EvalConfig(device="cpu")).records()
    classes = len(dataset.categories)
    assert len(detections) == 3 * classes
    # score = proposal score x class probability, so a box's scores over all classes sum to its score.
    per_box: dict[tuple, float] = {}
    for d in detections:
        key = (d["image_id"], tuple(d["bbox"]))
        per_box[key] = per_box.get(key, 0.0) + d["score"]
    expected = {(1, (0.0, 0.0, 30.0, 30.0)): 0.8, (1, (10.0, 10.0, 50.0, 40.0)): 0.5, (3, (5.0, 5.0, 15.0, 20.0)): 0.25}
    assert per_box.keys() == expected.keys()
    for key, score in expected.items():
        assert per_box[key] == pytest.approx(score, rel=1e-4)


def test_proposals_for_unknown_images_are_refused(tmp_path):
    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=2, seed=1, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, tmp_path / "images")
    path = tmp_path / "p.json"
    path.write_text('{"99": {"boxes": [], "scores": []}}')
    with pytest.raises(DatasetError, match=r"p.json: proposals for images not in .*\[99\]"):
        with_box_source(dataset, None, str(path))


def test_proposals_cache_reuses_the_feature_maps_and_computes_only_sam(tmp_path, tiny_models, encoders, monkeypatch):
    from regionspot_cache.extract.proposals import cache_with_boxes, proposals_cache_dir

    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=5, seed=4, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    config = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu")
    run_extraction(dataset, CacheTarget(tmp_path / "gt"), encoders, config)
    glip = tmp_path / "glip.json"
    glip.write_text(
        json.dumps(
            {
                "1": {"boxes": [[0, 0, 30, 30], [10, 10, 60, 50]], "scores": [0.8, 0.5], "labels": [0, 0]},
                "4": {"boxes": [[5, 5, 20, 25]], "scores": [0.25], "labels": [0]},
            }
        )
    )
    manifest = Manifest("toy", annotations, tmp_path / "images", proposals={"glip": glip})
    with_proposals, source = with_box_source(dataset, manifest, "glip")
    # The reference: a cache extracted from scratch for the proposals, CLIP included.
    run_extraction(with_proposals, CacheTarget(tmp_path / "full", box_source=source), encoders, config)

    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP image encoder must not run: the feature maps are cached")

    with monkeypatch.context() as patch:
        patch.setattr(encoders.clip, "feature_maps", no_clip)
        derived = cache_with_boxes(tmp_path / "gt", with_proposals, source, config, encoders=encoders)
    assert derived == proposals_cache_dir(tmp_path / "gt", source)
    assert cache_with_boxes(tmp_path / "gt", dataset, "gt", config, encoders=encoders) == tmp_path / "gt"
    full, borrowed, base = CacheReader(tmp_path / "full"), CacheReader(derived), CacheReader(tmp_path / "gt")
    assert borrowed.provenance.box_source == source and borrowed.vocabulary("toy").names == base.vocabulary("toy").names
    for image_id in full.image_ids():
        a, b = full.image(image_id), borrowed.image(image_id)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.feature_map, b.feature_map)
        np.testing.assert_array_equal(b.feature_map, base.image(image_id).feature_map)
    # The proposals cache stores no feature maps of its own, and moves with its base cache.
    assert sum(p.stat().st_size for p in derived.rglob("*") if p.is_file()) < 0.5 * sum(
        p.stat().st_size for p in (tmp_path / "full").rglob("*") if p.is_file()
    )
    moved = (tmp_path / "gt").rename(tmp_path / "moved")
    np.testing.assert_array_equal(CacheReader(proposals_cache_dir(moved, source)).image(1).feature_map, full.image(1).feature_map)


def test_proposals_cache_needs_a_complete_base(tmp_path, tiny_models, encoders):
    from regionspot_cache.extract.proposals import cache_with_boxes

    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=3, seed=4, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    config = ExtractConfig(shard_size=2, num_workers=0, device="cpu")
    run_extraction(dataset, CacheTarget(tmp_path / "gt"), encoders, config)
    import shutil

    shutil.rmtree(tmp_path / "gt" / "shards" / "000001")
    with pytest.raises(ValueError, match=r"gt: shards \[1\] are not extracted yet"):
        cache_with_boxes(tmp_path / "gt", dataset, "proposals:x:y", config, encoders=encoders)


def test_a_damaged_proposals_cache_is_repaired_like_the_base_cache(tmp_path, tiny_models, encoders):
    """verify reports damage in a proposals cache; repair finds its proposal set in the manifest
    (by the file's SHA-256 the cache recorded) and re-extracts its damaged shard."""
    from typer.testing import CliRunner

    from regionspot_cache.cache import verify_cache_tree
    from regionspot_cache.cli import app
    from regionspot_cache.extract.proposals import cache_with_boxes

    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=3, seed=4, min_size=48, max_size=64))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    config = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu")
    run_extraction(dataset, CacheTarget(tmp_path / "gt"), encoders, config)
    glip = tmp_path / "glip.json"
    glip.write_text(json.dumps({"1": {"boxes": [[0, 0, 30, 30]], "scores": [0.8], "labels": [0]}}))
    (tmp_path / "toy.toml").write_text(
        f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n[proposals]\nglip = "glip.json"\n'
    )
    manifest = Manifest("toy", annotations, tmp_path / "images", proposals={"glip": glip})
    derived = cache_with_boxes(tmp_path / "gt", *with_box_source(dataset, manifest, "glip"), config, encoders=encoders)
    tokens = next((derived / "shards" / "000000" / "features.zarr" / "box_tokens").rglob("c/*/*"))
    data = bytearray(tokens.read_bytes())
    data[len(data) // 2] ^= 0x01
    tokens.write_bytes(bytes(data))
    assert [p.shard for p in verify_cache_tree(tmp_path / "gt")[derived]] == ["000000"]
    result = CliRunner().invoke(
        app,
        [
            "repair",
            str(tmp_path / "gt"),
            "-m",
            str(tmp_path / "toy.toml"),
            "--data-root",
            str(tmp_path),
            "--set",
            "extract.num_workers=0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not any(verify_cache_tree(tmp_path / "gt").values())

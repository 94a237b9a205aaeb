"""Phase 1 end to end on generated data: values, resume, bad input, cache identity."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from regionspot_cache.cache import CacheFormatError, CacheReader
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction

CONFIG = ExtractConfig(shard_size=3, batch_size=2, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models, encoders):
    root = tmp_path_factory.mktemp("extract")
    annotations = generate_split(root, "train", SyntheticSpec(images=7, seed=3, min_size=64, max_size=120))
    models = tiny_models
    dataset = load_coco_format(annotations, root / "images", name="toy")
    cache = root / "cache"
    summary = run_extraction(dataset, CacheTarget(cache), encoders, CONFIG)
    return dataset, models, encoders, cache, summary


def test_every_image_and_box_is_cached(setup):
    dataset, _, _, cache, summary = setup
    reader = CacheReader(cache)
    assert sorted(reader.image_ids()) == sorted(e.id for e in dataset.images)
    assert summary.shards_written == 3 and summary.failed == 0
    for entry in dataset.images:
        item = reader.image(entry.id)
        expected = dataset.boxes_of(entry.id)
        np.testing.assert_allclose(item.boxes, expected.xyxy, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(item.category_ids, expected.category_ids)
        assert (item.width, item.height) == (entry.width, entry.height)
    assert summary.boxes == sum(len(dataset.boxes_of(e.id)) for e in dataset.images)


def test_cached_values_match_encoders_run_one_image_at_a_time(setup):
    """Batching several differently-sized images must not mix up or change their features."""
    dataset, _, encoders, cache, _ = setup
    reader = CacheReader(cache)
    for entry in dataset.images[:4]:
        image = load_rgb(dataset.image_path(entry))
        embedding = encoders.sam.embed_images([encoders.sam.resizer()(np.asarray(image))])[0]
        tokens = encoders.sam.box_tokens(embedding, dataset.boxes_of(entry.id).xyxy, (entry.height, entry.width))
        feature_map = encoders.clip.feature_maps(encoders.clip.preprocess(image)[None])[0]
        item = reader.image(entry.id)
        np.testing.assert_allclose(item.tokens.astype(np.float32), tokens.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(item.feature_map.astype(np.float32), feature_map.numpy(), rtol=2e-3, atol=2e-3)


def test_vocabulary_and_provenance(setup):
    dataset, models, encoders, cache, _ = setup
    reader = CacheReader(cache)
    vocab = reader.vocabulary("toy")
    assert vocab.names == [c.name for c in dataset.categories]
    expected = encoders.clip.text_embeddings(vocab.names).numpy()
    np.testing.assert_allclose(vocab.embeddings, expected, atol=1e-6)
    provenance = reader.provenance
    assert provenance.sam.variant == "tiny" and len(provenance.sam.checkpoint_sha256) == 64
    assert provenance.clip.model == models.clip.model and provenance.clip.width == encoders.clip.width
    assert provenance.clip.num_tokens == reader.image(dataset.images[0].id).feature_map.shape[0]


def test_split_boxes_clips_and_gives_reasons():
    from regionspot_cache.data.boxes import split_boxes
    from regionspot_cache.data.datasets import BoxSet

    xyxy = np.array([[-5, -5, 20, 20], [10, 10, 10, 30], [30, 5, 20, 9], [120, 60, 150, 90], [np.nan, 0, 5, 5]], np.float32)
    kept, rejected, reasons = split_boxes(BoxSet(xyxy, np.arange(5), np.ones(5, np.float32)), width=100, height=50)
    np.testing.assert_array_equal(kept.xyxy, [[0, 0, 20, 20]])
    assert kept.category_ids.tolist() == [0] and rejected.category_ids.tolist() == [1, 2, 3, 4]
    assert reasons == ["zero or negative size", "zero or negative size", "outside the image", "coordinates not finite"]
    np.testing.assert_array_equal(rejected.xyxy[:3], xyxy[1:4])  # recorded as given, not clipped


def _copy_cache(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _all_values(cache: Path) -> dict[int, tuple]:
    reader = CacheReader(cache)
    return {i: (reader.image(i).tokens, reader.image(i).feature_map) for i in reader.image_ids()}


def test_rerun_skips_committed_shards_and_fills_missing_ones(setup, tmp_path):
    dataset, models, encoders, cache, _ = setup
    copy = _copy_cache(cache, tmp_path / "cache")
    shutil.rmtree(copy / "shards" / "000001")
    summary = run_extraction(dataset, CacheTarget(copy), encoders, CONFIG)
    assert (summary.shards_skipped, summary.shards_written) == (2, 1)
    original, resumed = _all_values(cache), _all_values(copy)
    assert original.keys() == resumed.keys()
    for image_id, (tokens, feature_map) in original.items():
        np.testing.assert_array_equal(resumed[image_id][0], tokens)
        np.testing.assert_array_equal(resumed[image_id][1], feature_map)


def test_other_settings_are_refused_naming_the_difference(setup, tmp_path):
    dataset, models, encoders, cache, _ = setup
    copy = _copy_cache(cache, tmp_path / "cache")
    with pytest.raises(CacheFormatError, match="shard_size"):
        run_extraction(dataset, CacheTarget(copy), encoders, replace(CONFIG, shard_size=4))


def test_bad_image_and_degenerate_box_do_not_stop_the_run(setup, tmp_path):
    dataset, models, encoders, _, _ = setup
    broken = replace(dataset, image_root=tmp_path / "images")
    shutil.copytree(dataset.image_root, broken.image_root)
    victim = dataset.images[1]
    (broken.image_root / victim.file_name).write_bytes(b"not a jpeg")
    other = dataset.images[2]
    boxes = broken.boxes[other.id]
    broken.boxes = {
        **dataset.boxes,
        other.id: replace(boxes, xyxy=np.vstack([boxes.xyxy[:1] * 0 + [5, 5, 5, 9], boxes.xyxy[1:]]).astype(np.float32)),
    }
    summary = run_extraction(broken, CacheTarget(tmp_path / "cache"), encoders, CONFIG)
    assert summary.failed == 1 and summary.dropped_boxes == 1
    reader = CacheReader(tmp_path / "cache")
    assert victim.id not in reader.image_ids() and victim.id in reader.image_ids(only_ok=False)
    status, reason = reader.status(victim.id)
    assert status == "failed" and victim.file_name in reason and "cannot decode" in reason
    assert len(reader.image(other.id).boxes) == len(boxes) - 1
    rejected = reader.rejected_boxes.to_pylist()
    assert len(rejected) == 1 and rejected[0]["image_id"] == other.id
    assert rejected[0]["reason"] == "zero or negative size" and rejected[0]["x1"] == rejected[0]["x2"] == 5


def test_edited_boxes_are_noticed_instead_of_skipping_a_stale_shard(setup, tmp_path, tiny_models, encoders):
    import json

    from regionspot_cache.data.datasets import load_coco_format as load

    dataset, _, _, cache, _ = setup
    copy = Path(shutil.copytree(cache, tmp_path / "cache"))
    source = Path(dataset.image_root).parent / "train.json"
    annotations = json.loads(source.read_text())
    edited_image = sorted(dataset.images, key=lambda e: e.id)[4].id  # in shard 000001
    first = next(a for a in annotations["annotations"] if a["image_id"] == edited_image)
    first["bbox"] = [first["bbox"][0] + 3, *first["bbox"][1:]]
    (tmp_path / "val.json").write_text(json.dumps(annotations))
    edited = load(tmp_path / "val.json", dataset.image_root, name=dataset.name)
    with pytest.raises(CacheFormatError, match=r"shards 000001 were extracted from other images or boxes"):
        run_extraction(edited, CacheTarget(copy), encoders, CONFIG)
    assert run_extraction(dataset, CacheTarget(copy), encoders, CONFIG).shards_written == 0  # unchanged: skipped
    shutil.rmtree(copy / "shards" / "000001")  # the documented way to rebuild only what changed
    again = run_extraction(edited, CacheTarget(copy), encoders, CONFIG)
    assert again.shards_written == 1
    boxes = CacheReader(copy).image(edited_image).boxes
    assert boxes[0, 0] == pytest.approx(first["bbox"][0])

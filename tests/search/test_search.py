"""Region search: the index beside the cache (built once, keyed by the head, checksummed), text and
example-region queries, the contact sheet, and `rs-cache search`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head
from regionspot_cache.search import head_sha256, like_region, nearest_regions, open_region_index, parse_like
from regionspot_cache.search import index as index_module
from regionspot_cache.search.query import top_k_cosine

runner = CliRunner()
PLANTED = 99  # image id of the planted copy of image 2


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_models, encoders):
    """Four generated images plus a copy of image 2 under another id: its regions are planted
    twins, so a search for a region of image 2 must find the same region of the copy next."""
    root = tmp_path_factory.mktemp("search")
    annotation_file = generate_split(root, "val", SyntheticSpec(images=4, seed=3, min_size=64, max_size=80))
    data = json.loads(annotation_file.read_text())
    shutil.copy(root / "images" / "val" / "000002.jpg", root / "images" / "val" / "planted.jpg")
    data["images"].append({**data["images"][1], "id": PLANTED, "file_name": "val/planted.jpg"})
    twins = [{**a, "id": 1000 + a["id"], "image_id": PLANTED} for a in data["annotations"] if a["image_id"] == 2]
    data["annotations"] += twins
    annotation_file.write_text(json.dumps(data))
    dataset = load_coco_format(annotation_file, root / "images", name="planted")
    config = ExtractConfig(shard_size=2, num_workers=0, device="cpu")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, config)
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim, num_layers=1, ffn_dim=64))
    save_head(head, root / "head.safetensors")
    return root, head


def test_search_finds_the_planted_twin_first(planted):
    root, head = planted
    reader = CacheReader(root / "cache")
    index = open_region_index(reader, head, "cpu")
    assert len(index) == len(reader.boxes)
    hits = nearest_regions(index, like_region(index, 2, 0)[None], top=3)[0]
    assert {(h.image_id, h.box_index) for h in hits[:2]} == {(2, 0), (PLANTED, 0)}
    assert hits[0].score == pytest.approx(1.0, abs=1e-3) and hits[1].score == pytest.approx(1.0, abs=1e-3)
    assert hits[2].score < hits[1].score
    by_coordinates = like_region(index, PLANTED, [v + 1 for v in index.boxes[index.row(PLANTED, 0)].tolist()])
    np.testing.assert_array_equal(by_coordinates, index.embeddings[index.row(PLANTED, 0)])


def test_index_embeddings_are_the_heads_on_each_image(planted):
    root, head = planted
    reader = CacheReader(root / "cache")
    index = open_region_index(reader, head, "cpu")
    item = reader.image(3)
    with torch.no_grad():
        expected = head(
            torch.from_numpy(item.tokens.astype(np.float32))[None], torch.from_numpy(item.feature_map.astype(np.float32))[None]
        )[0]
    rows = np.flatnonzero(index.image_ids == 3)
    np.testing.assert_allclose(index.embeddings[rows], expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(index.boxes[rows], item.boxes)


def test_index_is_built_once_and_rebuilt_when_damaged(planted, monkeypatch):
    root, head = planted
    reader = CacheReader(root / "cache")
    first = open_region_index(reader, head, "cpu")
    directory = index_module.index_dir(reader.root, head_sha256(head))
    assert (directory / index_module.INDEX_FILE).is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an intact index")

    monkeypatch.setattr(index_module, "build_index", no_build)
    np.testing.assert_array_equal(open_region_index(reader, head, "cpu").embeddings, first.embeddings)
    monkeypatch.undo()
    data = bytearray((directory / index_module.INDEX_FILE).read_bytes())
    data[-8] ^= 0xFF
    (directory / index_module.INDEX_FILE).write_bytes(bytes(data))
    np.testing.assert_array_equal(open_region_index(reader, head, "cpu").embeddings, first.embeddings)
    other = RegionSpotHead(head.config)
    assert head_sha256(other) != head_sha256(head)


def test_chunked_top_k_equals_a_full_sort(monkeypatch):
    rng = np.random.default_rng(0)
    embeddings = torch.from_numpy(rng.normal(size=(1000, 16)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(3, 16)).astype(np.float32))
    monkeypatch.setattr("regionspot_cache.search.query.CHUNK_ROWS", 128)
    scores, rows = top_k_cosine(embeddings, queries, 25)
    full = (queries @ embeddings.T).numpy()
    np.testing.assert_array_equal(rows.numpy(), np.argsort(-full, axis=1, kind="stable")[:, :25])
    np.testing.assert_allclose(scores.numpy(), -np.sort(-full, axis=1)[:, :25], rtol=1e-6)


@pytest.mark.parametrize("text, expected", [("42:3", (42, 3)), ("7: 1,2,30.5,40", (7, [1.0, 2.0, 30.5, 40.0]))])
def test_like_syntax(text, expected):
    assert parse_like(text) == expected


@pytest.mark.parametrize("text", ["42", "a:1", "4:1,2,3", "4:"])
def test_like_syntax_errors_name_the_expected_form(text):
    with pytest.raises(ValueError, match="expected IMAGE:BOX"):
        parse_like(text)


def test_search_command_writes_hits_and_a_contact_sheet(planted, tmp_path):
    root, _ = planted
    out = tmp_path / "found"
    result = runner.invoke(
        app,
        [
            "search",
            "red square",
            "-c",
            str(root / "cache"),
            "--head",
            str(root / "head.safetensors"),
            "--like",
            "2:0",
            "--top",
            "4",
            "--out",
            str(out),
            "--image-root",
            str(root / "images"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    hits = json.loads((out / "hits.json").read_text())
    assert list(hits) == ["red square", "like 2:0"] and all(len(v) == 4 for v in hits.values())  # queries' order
    # The example region itself is left out; its planted copy comes first.
    assert (hits["like 2:0"][0]["image_id"], hits["like 2:0"][0]["box_index"]) == (PLANTED, 0)
    assert all((h["image_id"], h["box_index"]) != (2, 0) for h in hits["like 2:0"])
    assert all(h["file_name"] and h["category"] for found in hits.values() for h in found)
    scores = [h["score"] for h in hits["red square"]]
    assert scores == sorted(scores, reverse=True)
    with Image.open(out / "contact_sheet.png") as sheet:
        assert len(np.unique(np.asarray(sheet.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # crops, not blank cells
    bad = runner.invoke(app, ["search", "-c", str(root / "cache"), "--head", str(root / "head.safetensors"), "--like", "2:77"])
    assert bad.exit_code != 0 and "no cached box 77" in str(bad.exception) + bad.output

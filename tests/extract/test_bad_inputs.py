"""Awkward and bad images never stop extraction; --strict turns them into errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.extract import CacheTarget, ExtractionError, run_extraction

CONFIG = ExtractConfig(shard_size=4, batch_size=2, num_workers=0, device="cpu")


def _write_images(root):
    """name -> (file bytes writer, expected decoded size)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "sixteen.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 60x40 shows as 40x60
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif)
    (root / "truncated.jpg").write_bytes((root / "cmyk.jpg").read_bytes()[:200])
    (root / "empty.jpg").write_bytes(b"")
    (root / "noise.png").write_bytes(rng.bytes(500))


CASES = {  # file -> (width, height, status)
    "cmyk.jpg": (60, 40, "ok"),
    "gray.png": (60, 40, "ok"),
    "sixteen.png": (60, 40, "ok"),
    "palette.png": (60, 40, "ok"),
    "rotated.jpg": (40, 60, "ok"),
    "truncated.jpg": (60, 40, "failed"),
    "empty.jpg": (60, 40, "failed"),
    "noise.png": (60, 40, "failed"),
    "missing.jpg": (60, 40, "failed"),
    "../outside.jpg": (60, 40, "failed"),
}


@pytest.fixture()
def awkward(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _write_images(images)
    Image.new("RGB", (60, 40)).save(tmp_path / "outside.jpg")
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for image_id, (name, (width, height, _)) in enumerate(CASES.items(), start=1):
        data["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        data["annotations"].append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [2, 3, 20, 10]})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return load_coco_format(path, images, name="awkward")


def test_each_image_is_decoded_or_recorded_with_a_reason(awkward, tmp_path, tiny_models, encoders):
    summary = run_extraction(awkward, CacheTarget(tmp_path / "cache"), encoders, CONFIG)
    reader = CacheReader(tmp_path / "cache")
    statuses = {entry.file_name: reader.status(entry.id) for entry in awkward.images}
    for name, (_, _, expected) in CASES.items():
        status, reason = statuses[name]
        assert status == expected, (name, reason)
        if status == "failed":
            assert name.split("/")[-1] in reason
    assert "escapes the image root" in statuses["../outside.jpg"][1]
    assert summary.failed == sum(s == "failed" for *_, s in CASES.values())
    assert reader.image(5).feature_map.shape[0] == encoders.clip.num_tokens


def test_inspect_failed_lists_every_failed_image_and_rejected_box_with_its_reason(awkward, tmp_path, tiny_models, encoders):
    from typer.testing import CliRunner

    from regionspot_cache.cache import recorded_failures
    from regionspot_cache.cli import app

    first = awkward.images[0]
    boxes = awkward.boxes[first.id]
    odd = np.concatenate([boxes.xyxy, [[5, 5, 1, 9]]]).astype(np.float32)
    dataset = replace(
        awkward,
        boxes={
            **awkward.boxes,
            first.id: replace(
                boxes, xyxy=odd, category_ids=np.append(boxes.category_ids, 1), scores=np.append(boxes.scores, 1.0)
            ),
        },
    )
    run_extraction(dataset, CacheTarget(tmp_path / "cache"), encoders, CONFIG)
    recorded = recorded_failures(tmp_path / "cache")
    failed = {name for name, (*_, status) in CASES.items() if status == "failed"}
    assert {row["file_name"] for row in recorded.images} == failed
    assert all(row["file_name"].split("/")[-1] in row["reason"] for row in recorded.images)
    assert [(row["image_id"], row["x1"], row["x2"], row["reason"]) for row in recorded.boxes] == [
        (first.id, 5.0, 1.0, "zero or negative size")
    ]
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "cache"), "--failed"])
    assert result.exit_code == 0, result.output
    assert f"{len(failed)} failed images" in result.output and "1 rejected boxes" in result.output
    assert "zero or negative size" in result.output


def test_decoding_normalises_modes_and_orientation(awkward):
    for entry in awkward.images[:5]:
        image = load_rgb(awkward.image_path(entry))
        assert image.mode == "RGB" and image.size == (entry.width, entry.height), entry.file_name
    sixteen = np.asarray(load_rgb(awkward.image_root / "sixteen.png"))
    gray = np.asarray(load_rgb(awkward.image_root / "gray.png"))
    np.testing.assert_array_equal(sixteen, gray)  # 16-bit keeps its top 8 bits


def test_strict_names_a_degenerate_box(awkward, tmp_path, tiny_models, encoders):
    first = awkward.images[0]
    boxes = awkward.boxes[first.id]
    broken = replace(awkward, images=[first], boxes={first.id: replace(boxes, xyxy=np.array([[5, 5, 1, 9]], np.float32))})
    with pytest.raises(ExtractionError, match=r"image 1 \(cmyk.jpg\): box \[5.0, 5.0, 1.0, 9.0\]: zero or negative size"):
        run_extraction(broken, CacheTarget(tmp_path / "cache"), encoders, replace(CONFIG, strict=True))


def test_strict_stops_at_the_first_bad_image_keeping_earlier_shards(awkward, tmp_path, tiny_models, encoders):
    strict = replace(CONFIG, strict=True)
    with pytest.raises(ExtractionError, match="truncated.jpg"):
        run_extraction(awkward, CacheTarget(tmp_path / "cache"), encoders, strict)
    assert [p.name for p in (tmp_path / "cache" / "shards").iterdir() if p.name.isdigit()] == ["000000"]

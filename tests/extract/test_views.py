"""Augmented views: the transforms, view caches in both modes, resume, verify, repair and inspect."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from regionspot_cache.cache import CacheReader, inspect_cache, verify_cache_tree
from regionspot_cache.cache.format import FEATURES_DIR, SHARDS_DIR, CacheFormatError
from regionspot_cache.config import ConfigError, ExtractConfig, Recipe, apply_overrides
from regionspot_cache.data.datasets import BoxSet, ImageEntry, load_coco_format
from regionspot_cache.data.views import apply_view, parse_views, view_by_id, view_geometry
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.repair import repair_cache
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.extract.views import extract_views, view_cache_dir


def test_view_specs_expand_and_bad_ones_name_the_field():
    ids = [v.id for v in parse_views(["identity", "hflip", "crop:0.6-1.0x2", "hflip+crop:0.5-0.8"])]
    assert ids == ["hflip", "crop-0.6-1-0", "crop-0.6-1-1", "hflip+crop-0.5-0.8-0"]
    assert all(view_by_id(i) == v for i, v in zip(ids, parse_views(["hflip", "crop:0.6-1.0x2", "hflip+crop:0.5-0.8"])))
    for bad in ("vflip", "crop:0.8-0.6", "crop:0-1", "crop:a-b", ""):
        with pytest.raises(ConfigError, match=r"extract.views\[0\]"):
            ExtractConfig(views=[bad])
    with pytest.raises(ConfigError, match="views_mode"):
        apply_overrides(Recipe(), ["extract.views_mode=both"]).extract.validate()


def test_a_view_moves_boxes_with_the_pixels_and_drops_those_outside_with_a_reason():
    image = Image.new("RGB", (100, 60))
    image.paste((255, 0, 0), (10, 10, 30, 30))  # the pixels of box 0
    entry = ImageEntry(7, "x.jpg", 100, 60)
    boxes = BoxSet(
        np.array([[10, 10, 30, 30], [90, 50, 99, 59], [5, 5, 5, 9]], np.float32), np.array([1, 2, 3]), np.ones(3, np.float32)
    )
    flipped = apply_view(view_by_id("hflip"), 0, image, entry, boxes)
    np.testing.assert_array_equal(flipped.boxes.xyxy[0], [70, 10, 90, 30])
    assert np.asarray(flipped.image)[20, 80].tolist() == [255, 0, 0]
    assert flipped.dropped_reasons == ["zero or negative size"]  # degenerate as given, as split_boxes says
    crop = view_by_id("crop-0.3-0.5-0")
    geometry = view_geometry(crop, 3, 7, 100, 60)
    assert geometry == view_geometry(crop, 3, 7, 100, 60) != view_geometry(crop, 4, 7, 100, 60)
    assert 30 <= geometry.width <= 50 and 18 <= geometry.height <= 30
    cropped = apply_view(crop, 3, image, entry, boxes)
    assert cropped.image.size == (geometry.width, geometry.height) == (cropped.entry.width, cropped.entry.height)
    assert len(cropped.boxes) + len(cropped.dropped) == 3
    assert (cropped.boxes.xyxy >= 0).all() and (cropped.boxes.xyxy[:, 2] <= geometry.width).all()
    assert "outside view crop-0.3-0.5-0" in cropped.dropped_reasons


@pytest.fixture()
def toy(tmp_path, tiny_models, encoders):
    annotations = generate_split(tmp_path, "train", SyntheticSpec(images=3, seed=4, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, tmp_path / "images", name="toy")
    config = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu", views=["hflip", "crop:0.4-0.7"])
    run_extraction(dataset, CacheTarget(tmp_path / "base"), encoders, config)
    return dataset, config, tmp_path / "base"


def test_released_views_store_only_the_clip_maps_of_the_view(toy, encoders, monkeypatch):
    dataset, config, base = toy

    def no_sam(*args, **kwargs):
        raise AssertionError("SAM must not run for a released view: its tokens are the base cache's")

    monkeypatch.setattr(encoders.sam, "embed_images", no_sam)
    summaries = extract_views(dataset, base, config, encoders=encoders)
    assert set(summaries) == {"hflip", "crop-0.4-0.7-0"}
    flipped, reader = CacheReader(view_cache_dir(base, "hflip")), CacheReader(base)
    assert flipped.provenance.kind.view.mode == "released" and len(flipped.boxes) == 0
    for image_id in reader.image_ids():
        assert not np.array_equal(flipped.feature_map(image_id), reader.feature_map(image_id))
    summary = inspect_cache(base)
    assert set(summary["views"]) == {"hflip", "crop-0.4-0.7-0"}
    view = summary["views"]["hflip"]
    assert view["mode"] == "released" and view["images"] == 3 and view["extracted_images"] == 3
    assert 0 < view["bytes_on_disk"] < summary["bytes_on_disk"] and view["extraction_seconds"] > 0


def test_consistent_views_resume_verify_and_repair_per_view(toy, tiny_models, encoders):
    dataset, config, base = toy
    config.views_mode = "consistent"
    extract_views(dataset, base, config, encoders=encoders)
    crop = view_cache_dir(base, "crop-0.4-0.7-0")
    reader, original = CacheReader(crop), CacheReader(base)
    assert reader.provenance.kind.view.mode == "consistent"
    assert len(reader.boxes) + sum(r.startswith("outside view") for r in reader.rejected_boxes["reason"].to_pylist()) == len(
        original.boxes
    )
    for image_id in reader.image_ids():  # boxes are inside the view, and the view's size is recorded
        item = reader.image(image_id)
        assert (item.boxes[:, 2] <= item.width).all() and (item.boxes[:, 3] <= item.height).all()
        assert item.width < original.image(image_id).width
    before = {i: reader.image(i) for i in reader.image_ids()}
    # Resume: re-running skips every committed shard of every view.
    again = extract_views(dataset, base, config, encoders=encoders)
    assert all(s.shards_written == 0 and s.shards_skipped == 2 for s in again.values())
    # Another mode into the same view caches is refused by the identity check.
    with pytest.raises(CacheFormatError, match="view"):
        extract_views(dataset, base, ExtractConfig(shard_size=2, num_workers=0, views=["hflip"]), encoders=encoders)
    # Damage a view's shard: verify names it, repair re-extracts it to the same values.
    features = crop / SHARDS_DIR / "000000" / FEATURES_DIR
    zarr_file = next(p for p in features.rglob("*") if p.is_file() and p.stat().st_size > 100)
    zarr_file.write_bytes(b"\0" * zarr_file.stat().st_size)
    problems = verify_cache_tree(base)
    assert problems[crop] and not problems[base] and not problems[view_cache_dir(base, "hflip")]
    repaired = repair_cache(crop, dataset, "gt", config, tiny_models, encoders=encoders)
    assert list(repaired.damaged) == ["000000"] and not any(verify_cache_tree(base).values())
    after = CacheReader(crop)
    for image_id, item in before.items():
        np.testing.assert_array_equal(after.image(image_id).boxes, item.boxes)
        np.testing.assert_allclose(after.image(image_id).tokens, item.tokens, atol=1e-3)
        np.testing.assert_allclose(after.image(image_id).feature_map, item.feature_map, atol=1e-3)

"""Integrity: a flipped byte in any file of a shard is found by ``verify`` and named by shard;
``rs-cache repair`` re-extracts only the damaged shards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader, verify_cache
from regionspot_cache.cli import app
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction

CONFIG = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_models, encoders):
    root = tmp_path_factory.mktemp("integrity")
    annotations = generate_split(root, "val", SyntheticSpec(images=6, seed=8, min_size=64, max_size=80))
    (root / "toy.toml").write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    dataset = load_coco_format(annotations, root / "images", name="toy")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, CONFIG)
    return root


def _flip(path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def _shard_files(cache, shard: str) -> list[str]:
    directory = cache / "shards" / shard
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_a_flipped_byte_in_any_file_names_the_shard(pristine, tmp_path):
    files = _shard_files(pristine / "cache", "000001")
    assert any(f.endswith(".parquet") for f in files) and any("/c/" in f for f in files)
    for name in files:
        cache = shutil.copytree(pristine / "cache", tmp_path / "cache")
        _flip(cache / "shards" / "000001" / name)
        problems = verify_cache(cache)
        assert {p.shard for p in problems} == {"000001"}, name
        if name != "checksums.json":  # there the flip may break the JSON or change one recorded sum
            assert [p.problem for p in problems] == [f"{name}: checksum differs (damaged)"]
        shutil.rmtree(cache)


def _values(cache) -> dict:
    reader = CacheReader(cache)
    return {i: (reader.image(i).tokens, reader.image(i).feature_map, reader.image(i).boxes) for i in reader.image_ids()}


def test_repair_re_extracts_only_the_damaged_shards(pristine, tmp_path):
    cache = shutil.copytree(pristine / "cache", tmp_path / "cache")
    _flip(next((cache / "shards" / "000000" / "features.zarr" / "clip_maps").rglob("c/*/*/*")))
    _flip(cache / "shards" / "000002" / "images.parquet")
    intact = (cache / "shards" / "000001").stat().st_ino
    models = CacheReader(cache).provenance.weights
    result = CliRunner().invoke(
        app,
        [
            "repair",
            str(cache),
            "-m",
            str(pristine / "toy.toml"),
            "--data-root",
            str(pristine),
            "--set",
            "extract.num_workers=0",
            "--set",
            "extract.batch_size=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "shard 000000 re-extracted" in result.output and "shard 000002 re-extracted" in result.output
    assert "000001" not in result.output and (cache / "shards" / "000001").stat().st_ino == intact
    assert models.sam_checkpoint and verify_cache(cache) == []
    expected, repaired = _values(pristine / "cache"), _values(cache)
    assert expected.keys() == repaired.keys()
    for image_id, arrays in expected.items():
        for want, got in zip(arrays, repaired[image_id]):
            np.testing.assert_array_equal(got, want)
    again = CliRunner().invoke(app, ["repair", str(cache), "-m", str(pristine / "toy.toml"), "--data-root", str(pristine)])
    assert again.exit_code == 0 and "nothing to repair" in again.output


def test_verify_also_checks_the_proposals_caches_inside(pristine, tiny_models, encoders, tmp_path):
    import json

    from regionspot_cache.data.proposals import with_box_source
    from regionspot_cache.extract.proposals import cache_with_boxes

    cache = shutil.copytree(pristine / "cache", tmp_path / "cache")
    dataset = load_coco_format(pristine / "val.json", pristine / "images", name="toy")
    proposals = tmp_path / "boxes.json"
    proposals.write_text(
        json.dumps([{"image_id": entry.id, "bbox": [2, 3, 30, 20], "score": 0.5, "category_id": 1} for entry in dataset.images])
    )
    derived = cache_with_boxes(cache, *with_box_source(dataset, None, str(proposals)), CONFIG, encoders=encoders)
    clean = CliRunner().invoke(app, ["verify", str(cache)])
    assert clean.exit_code == 0 and _unwrapped("and 1 proposals cache(s)") in _unwrapped(clean.output), clean.output
    _flip(derived / "shards" / "000002" / "boxes.parquet")
    damaged = CliRunner().invoke(app, ["verify", str(cache)])
    assert damaged.exit_code == 1
    expected = f"proposals/{derived.name} shard 000002: boxes.parquet: checksum differs"
    assert _unwrapped(expected) in _unwrapped(damaged.output), damaged.output


def _unwrapped(text: str) -> str:
    """Without whitespace: the console wraps long lines, even inside a long cache name."""
    return "".join(text.split())


def test_any_damaged_file_is_an_error_naming_its_shard_on_read_and_repair_restores_it(pristine, tmp_path, tiny_models, encoders):
    """Truncation (what a full disk or a copy cut short leaves) of each file of a shard: reading
    fails with an error naming the shard (or does not need the file), and repair restores the
    same values whatever the file was."""
    from regionspot_cache.cache import CacheFormatError
    from regionspot_cache.extract.repair import repair_cache

    dataset = load_coco_format(pristine / "val.json", pristine / "images", name="toy")
    expected = _values(pristine / "cache")
    for name in _shard_files(pristine / "cache", "000001"):
        cache = shutil.copytree(pristine / "cache", tmp_path / "cache")
        damaged = cache / "shards" / "000001" / name
        damaged.write_bytes(damaged.read_bytes()[:7])
        try:
            _values(cache)
        except CacheFormatError as err:
            assert "000001" in str(err), (name, err)
        else:
            assert name in ("checksums.json", "input.json"), f"{name}: truncated, yet read without an error"
        summary = repair_cache(cache, dataset, "gt", CONFIG, tiny_models, encoders)
        assert list(summary.damaged) == ["000001"], name
        assert verify_cache(cache) == [], name
        repaired = _values(cache)
        for image_id, arrays in expected.items():
            for want, got in zip(arrays, repaired[image_id]):
                np.testing.assert_array_equal(got, want)
        shutil.rmtree(cache)


def test_repair_re_extracts_as_the_cache_recorded_whatever_the_recipe_says(pristine, tmp_path, tiny_models, encoders):
    """A cache made with released preprocessing and int8 storage is repaired the same way, even
    with a default config (the identity check would otherwise refuse the repair)."""
    from dataclasses import replace

    from regionspot_cache.extract.repair import repair_cache

    dataset = load_coco_format(pristine / "val.json", pristine / "images", name="toy")
    made_as = replace(CONFIG, preprocess="released", feature_dtype="int8")
    run_extraction(dataset, CacheTarget(tmp_path / "cache"), encoders, made_as)
    expected = _values(tmp_path / "cache")
    _flip(tmp_path / "cache" / "shards" / "000002" / "boxes.parquet")
    summary = repair_cache(tmp_path / "cache", dataset, "gt", CONFIG, tiny_models, encoders)
    assert list(summary.damaged) == ["000002"] and verify_cache(tmp_path / "cache") == []
    repaired = _values(tmp_path / "cache")
    for image_id, arrays in expected.items():
        for want, got in zip(arrays, repaired[image_id]):
            np.testing.assert_array_equal(got, want)


def test_repair_refuses_a_replacement_less_complete_than_the_damaged_shard(pristine, tmp_path):
    """One damaged feature byte while the images cannot be read: repair would swap good records for
    failed ones. It keeps the damaged shard (verify still names it) and says what it could not read."""
    root = shutil.copytree(pristine, tmp_path / "work", ignore=shutil.ignore_patterns("regions"))
    cache = root / "cache"
    _flip(next((cache / "shards" / "000000" / "features.zarr" / "clip_maps").rglob("c/*/*/*")))
    shutil.move(root / "images", root / "images-away")  # e.g. a network disk not mounted at the moment
    before = CacheReader(cache).status(1)
    result = CliRunner().invoke(
        app, ["repair", str(cache), "-m", str(root / "toy.toml"), "--data-root", str(root), "--set", "extract.num_workers=0"]
    )
    assert result.exit_code != 0 and "repair refused for shard(s) 000000" in str(result.exception), result.output
    assert {p.shard for p in verify_cache(cache)} == {"000000"} and CacheReader(cache).status(1) == before
    shutil.move(root / "images-away", root / "images")
    result = CliRunner().invoke(
        app, ["repair", str(cache), "-m", str(root / "toy.toml"), "--data-root", str(root), "--set", "extract.num_workers=0"]
    )
    assert result.exit_code == 0, result.output
    assert verify_cache(cache) == []

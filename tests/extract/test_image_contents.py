"""Image files replaced under the same name and size: recorded at extraction (a content digest per
image in each shard's input.json), found on demand (``verify --images``, ``extract
--check-images``) and re-extracted by ``repair --images``; caches written before keep working."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionspot_cache import cli
from regionspot_cache.cache import CacheFormatError, CacheReader
from regionspot_cache.cache.contents import ImageDigests, ShardInput, check_image_contents
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.reader import ImageReader
from regionspot_cache.extract.repair import repair_cache
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.runtime.files import file_content_digest

CONFIG = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def made(tmp_path_factory, encoders):
    """Four generated images in two shards, and their cache."""
    root = tmp_path_factory.mktemp("contents")
    annotations = generate_split(root, "val", SyntheticSpec(images=4, seed=5, min_size=48, max_size=64))
    (root / "toy.toml").write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    dataset = load_coco_format(annotations, root / "images", name="toy")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, CONFIG)
    return root, dataset


@pytest.fixture
def edited(made, tmp_path):
    """A copy of the images and the cache, with the last image's pixels replaced (same name and size)."""
    root, _ = made
    shutil.copytree(root / "images", tmp_path / "images")
    shutil.copy(root / "toy.toml", tmp_path)
    shutil.copy(root / "val.json", tmp_path)
    shutil.copytree(root / "cache", tmp_path / "cache")
    dataset = load_coco_format(tmp_path / "val.json", tmp_path / "images", name="toy")
    victim = max(dataset.images, key=lambda entry: entry.id)  # the second shard's
    path = dataset.image_path(victim)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(255 - pixels).save(path, quality=92)
    return tmp_path, dataset, victim


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["rs-cache", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, " ".join((captured.out + captured.err).split())


def test_each_shard_records_the_bytes_of_each_of_its_images(made):
    root, dataset = made
    recorded = {}
    for shard in (0, 1):
        record = ShardInput.read(CacheLocation.parse(root / "cache"), shard)
        assert record is not None and len(record.images) == 2
        recorded.update(record.images)
    assert recorded == {entry.id: file_content_digest(dataset.image_path(entry)) for entry in dataset.images}


def test_the_device_decode_path_records_the_same_digest(made):
    """Workers that only read JPEG bytes (extract.decode = "device") digest those bytes."""
    _, dataset = made
    entry = dataset.images[0]
    loaded = ImageReader(dataset, [entry], None, None, device_decode=True)[0]
    assert loaded.jpeg is not None and loaded.content == file_content_digest(dataset.image_path(entry))


def test_verify_images_names_the_replaced_image_and_the_repair_command(edited, monkeypatch, capsys):
    root, _, victim = edited
    check = check_image_contents(root / "cache", ImageDigests(load_coco_format(root / "val.json", root / "images")))
    assert check.stale_shards == [1] and [p.image_id for p in check.problems] == [victim.id]
    assert check.checked_images == 4 and not check.unrecorded_shards
    code, printed = _run(
        monkeypatch, capsys, "verify", str(root / "cache"), "--images", "-m", str(root / "toy.toml"), "--data-root", str(root)
    )
    assert code == 1
    assert f"shard 000001: image {victim.id} ({victim.file_name}): bytes differ from those extracted" in printed
    assert f"rs-cache repair {root / 'cache'} --manifest {root / 'toy.toml'} --images" in printed


def test_verify_images_passes_on_unchanged_images_and_json_says_what_was_checked(made, monkeypatch, capsys):
    root, _ = made
    args = ["verify", str(root / "cache"), "--images", "-m", str(root / "toy.toml"), "--data-root", str(root)]
    code, printed = _run(monkeypatch, capsys, *args)
    assert code == 0 and "4 image(s) checked" in printed
    code, printed = _run(monkeypatch, capsys, *args, "--json")
    [check] = json.loads(printed)["images"]
    assert code == 0 and check["checked_images"] == 4 and check["changed"] == []


@pytest.mark.parametrize("args", [["--images"], ["-m", "toy.toml"]])
def test_verify_refuses_images_without_a_manifest_and_a_manifest_without_images(made, monkeypatch, capsys, args):
    root, _ = made
    code, printed = _run(monkeypatch, capsys, "verify", str(root / "cache"), *args)
    assert code == 2 and printed.count("error:") == 1 and "--images" in printed and "--manifest" in printed


def test_extract_check_images_refuses_to_skip_a_shard_whose_image_was_replaced(edited, encoders):
    root, dataset, victim = edited
    target = CacheTarget(root / "cache")
    run_extraction(dataset, target, encoders, CONFIG)  # by default: not read again, resumed as it is
    with pytest.raises(CacheFormatError, match=rf"1 image\(s\) replaced .*image {victim.id} .*repair .*--images"):
        run_extraction(dataset, target, encoders, replace(CONFIG, check_images=True))


def test_repair_images_re_extracts_only_the_shard_whose_image_was_replaced(edited, encoders):
    root, dataset, victim = edited
    before = CacheReader(root / "cache")
    kept, old = before.image(min(e.id for e in dataset.images)), before.image(victim.id)
    summary = repair_cache(root / "cache", dataset, "gt", CONFIG, encoders=encoders, image_digests=ImageDigests(dataset))
    assert list(summary.damaged) == ["000001"] and "bytes differ" in summary.damaged["000001"][0]
    after = CacheReader(root / "cache")
    assert np.array_equal(after.image(min(e.id for e in dataset.images)).feature_map, kept.feature_map)
    assert not np.array_equal(after.image(victim.id).feature_map, old.feature_map)
    assert check_image_contents(root / "cache", ImageDigests(dataset)).problems == []


def test_shards_written_before_image_digests_are_named_not_failed(edited):
    root, dataset, _ = edited
    for shard in ("000000", "000001"):  # input.json as caches wrote it before: the digest alone
        path = root / "cache" / "shards" / shard / "input.json"
        path.write_text(json.dumps({"sha256": json.loads(path.read_text())["sha256"]}))
    check = check_image_contents(root / "cache", ImageDigests(dataset))
    assert check.problems == [] and check.unrecorded_shards == [0, 1] and check.checked_images == 0
    assert CacheReader(root / "cache").image(dataset.images[0].id) is not None


def test_a_damaged_input_record_is_named_and_the_other_shards_still_checked(made, tmp_path, monkeypatch, capsys):
    root, dataset = made
    cache = Path(shutil.copytree(root / "cache", tmp_path / "cache"))
    (cache / "shards" / "000000" / "input.json").write_text('{"sha256": "x", "image_bytes": {"algorithm": "sha256"}}')
    with pytest.raises(CacheFormatError, match=r"000000/input.json: damaged"):
        ShardInput.read(CacheLocation.parse(cache), 0)
    check = check_image_contents(cache, ImageDigests(dataset))
    assert check.unreadable_shards == [0] and check.checked_images == 2 and check.problems == []
    code, printed = _run(
        monkeypatch, capsys, "verify", str(cache), "--images", "-m", str(root / "toy.toml"), "--data-root", str(root)
    )
    assert code == 1 and "shard 000000: input.json unreadable" in printed and "checksum differs" in printed


def test_resuming_with_other_preprocessing_is_refused_naming_it(made, encoders, tmp_path):
    """Preprocessing is part of what the features were made from: the cache's identity records it."""
    root, dataset = made
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    with pytest.raises(
        CacheFormatError, match=r"(?s)clip.preprocess: cache has 'resize .*this run has 'detectron2 test resize.*sam.preprocess"
    ):
        run_extraction(dataset, CacheTarget(cache), encoders, replace(CONFIG, preprocess="released"))


def test_the_repair_command_with_images_re_extracts_and_verify_then_passes(edited, monkeypatch, capsys):
    root, _, victim = edited
    where = ["-m", str(root / "toy.toml"), "--data-root", str(root)]
    code, printed = _run(monkeypatch, capsys, "repair", str(root / "cache"), *where, "--images", "--set", "extract.num_workers=0")
    assert code == 0 and f"shard 000001 re-extracted: image {victim.id} ({victim.file_name}): bytes differ" in printed
    code, printed = _run(monkeypatch, capsys, "verify", str(root / "cache"), "--images", *where)
    assert code == 0 and "every file holds the bytes it was extracted from" in printed

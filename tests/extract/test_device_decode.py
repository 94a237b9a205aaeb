"""extract.decode = "device" run on the CPU (device tensors on the CPU): the same features as the
CPU path within the rounding of the resizes, every hostile image still recorded as failed with its
reason, and the loader's wait recorded in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.report import print_extract_summary
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from tests.extract.test_fast_decode import _exif, photo_like
from tests.faults.test_hostile_inputs import PIXEL_LIMIT, _corpus

CONFIG = ExtractConfig(shard_size=4, batch_size=3, num_workers=0, device="cpu")


def _dataset(root: Path, files: dict[str, tuple[bytes | None, tuple[int, int]]], name: str):
    images = root / "images"
    images.mkdir(parents=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for image_id, (file_name, (content, (width, height))) in enumerate(files.items(), start=1):
        (images / file_name).mkdir() if content is None else (images / file_name).write_bytes(content)
        data["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        data["annotations"].append(
            {"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [2, 3, width / 2, height / 2]}
        )
    (root / "ann.json").write_text(json.dumps(data))
    return load_coco_format(root / "ann.json", images, name=name)


def _photos(root: Path) -> dict[str, tuple[bytes, tuple[int, int]]]:
    files = {}
    for i, (height, width) in enumerate([(96, 128), (120, 90), (100, 100)]):
        image = Image.fromarray(photo_like(height, width, seed=i))
        image.save(root / "tmp.jpg", "JPEG", quality=90)
        files[f"photo{i}.jpg"] = ((root / "tmp.jpg").read_bytes(), (width, height))
    image = Image.fromarray(photo_like(80, 110, seed=9))
    for name, fmt, kwargs, size in [
        ("photo.png", "PNG", {}, (110, 80)),
        ("cmyk.jpg", "JPEG", {}, (110, 80)),
        ("rotated.jpg", "JPEG", {"exif": _exif(6)}, (80, 110)),
        ("photo.webp", "WEBP", {"lossless": True}, (110, 80)),
    ]:
        (image.convert("CMYK") if name == "cmyk.jpg" else image).save(root / "tmp", fmt, **kwargs)
        files[name] = ((root / "tmp").read_bytes(), size)
    return files


@pytest.mark.parametrize("preprocess", ["direct", "released"])
def test_device_path_gives_the_cpu_paths_features(tmp_path, tiny_models, encoders, preprocess):
    dataset = _dataset(tmp_path / "data", _photos(tmp_path), "photos")
    readers = {}
    for decode in ("cpu", "device"):
        config = ExtractConfig(**{**CONFIG.__dict__, "decode": decode, "preprocess": preprocess})
        summary = run_extraction(dataset, CacheTarget(tmp_path / decode), encoders, config)
        assert summary.failed == 0
        readers[decode] = CacheReader(tmp_path / decode)
    for entry in dataset.images:
        cpu, device = readers["cpu"].image(entry.id), readers["device"].image(entry.id)
        for name in ("feature_map", "tokens"):
            ours, expected = getattr(device, name).astype(np.float32), getattr(cpu, name).astype(np.float32)
            error = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
            # non-JPEGs are decoded in the workers as before: identical; JPEGs: the resizes' rounding
            limit = 0.02 if entry.file_name.startswith("photo") and entry.file_name.endswith(".jpg") else 1e-6
            assert error <= limit, (entry.file_name, name, error)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_hostile_images_are_recorded_with_their_reason_on_both_paths(tmp_path, tiny_models, encoders, decode):
    corpus = _corpus()
    files = {name: (None if name == "is_a_directory.jpg" else content, size) for name, (content, size, _) in corpus.items()}
    ok = files["ok.jpg"][0]
    files["corrupt_middle.jpg"] = (ok[:200] + bytes(200) + ok[400:], (64, 48))  # ends as a JPEG, does not decode
    dataset = _dataset(tmp_path / "data", files, "hostile")
    config = ExtractConfig(**{**CONFIG.__dict__, "decode": decode, "max_image_pixels": PIXEL_LIMIT})
    run_extraction(dataset, CacheTarget(tmp_path / "cache"), encoders, config)
    reader = CacheReader(tmp_path / "cache")
    for entry in dataset.images:
        status, reason = reader.status(entry.id)
        if entry.file_name in corpus:
            assert status == corpus[entry.file_name][2], (entry.file_name, reason)
        if status == "failed":
            assert entry.file_name in reason and "Traceback" not in reason, reason


def test_loader_wait_is_recorded_per_batch_and_printed(tmp_path, tiny_models, encoders, capsys):
    dataset = _dataset(tmp_path / "data", _photos(tmp_path), "photos")
    summary = run_extraction(dataset, CacheTarget(tmp_path / "cache"), encoders, CONFIG)
    assert summary.batches == 3  # 7 images: shards of 4 and 3, batches of at most 3 within a shard
    assert summary.loader_wait_seconds >= 0 and summary.loader_wait_per_batch >= 0
    print_extract_summary(summary)
    assert "loader wait" in capsys.readouterr().err

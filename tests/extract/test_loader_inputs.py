"""The loader's SAM and CLIP inputs equal, bit for bit, those of the preprocessing before issue 26
(kept verbatim in benchmarks/feeder_today.py, the feeder benchmark's baseline), for ``direct``
and ``released``, at the sizes that upsample, keep or downsample SAM's input."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.encoders import preprocess as steps
from regionspot_cache.encoders.clip import ClipPreprocess
from regionspot_cache.encoders.preprocess import TestResize
from regionspot_cache.encoders.sam import SamResize
from regionspot_cache.extract.reader import ImageReader
from tests.helpers import photo_like

TODAY_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "feeder_today.py"
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# (width, height): SAM upsamples x6.4; COCO-like (SAM and the test resize upsample); SAM keeps the
# size (1024 long side); an odd height; a portrait that SAM and the test resize shrink.
SIZES = [(160, 120), (640, 480), (1024, 768), (1024, 683), (900, 1200)]


def _today():
    if "feeder_today" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("feeder_today", TODAY_PATH)
        sys.modules["feeder_today"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["feeder_today"])
    return sys.modules["feeder_today"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """JPEGs q90 at each size, one grayscale JPEG (libjpeg-turbo path) and one PNG (PIL's)."""
    root = tmp_path_factory.mktemp("loader_inputs")
    (root / "images").mkdir()
    files = [(f"{w}x{h}.jpg", photo_like(h, w, seed=i)) for i, (w, h) in enumerate(SIZES)]
    files += [("gray.jpg", photo_like(300, 400, seed=9)[..., 0]), ("photo.png", photo_like(200, 260, seed=7))]
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for image_id, (name, pixels) in enumerate(files, start=1):
        Image.fromarray(pixels).save(root / "images" / name, quality=90)
        height, width = pixels.shape[:2]
        data["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        data["annotations"].append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [5, 5, 20, 20]})
    (root / "ann.json").write_text(json.dumps(data))
    return load_coco_format(root / "ann.json", root / "images", name="photos")


@pytest.mark.parametrize(
    ("preprocess", "interpolation"), [("direct", "bicubic"), ("direct", "bilinear"), ("released", "bicubic")]
)
def test_loader_inputs_equal_todays_bit_for_bit(dataset, preprocess, interpolation):
    sam = SamResize(1024, steps.test_resize_for(preprocess))
    clip = ClipPreprocess((224, 224), MEAN, STD, interpolation, preprocess)
    ours = ImageReader(dataset, dataset.images, sam, clip)  # libjpeg-turbo decode (extract.decode = "cpu")
    today = _today().TodayReader(dataset, dataset.images, sam, clip, load=load_rgb)
    for index in range(len(ours)):
        new, old = ours[index], today[index]
        assert not new.error and not old.error
        for name in ("sam_pixels", "clip_pixels"):
            mine, theirs = getattr(new, name), getattr(old, name)
            assert mine.dtype == theirs.dtype and mine.is_contiguous() == theirs.is_contiguous()
            assert torch.equal(mine, theirs), f"{new.entry.file_name}: {name} differs from today's"


def test_sam_resize_takes_an_array_or_a_pil_image_as_before(dataset):
    today = _today()
    image = load_rgb(dataset.image_path(dataset.images[1]))
    for test_resize in (None, TestResize()):
        sam = SamResize(1024, test_resize)
        expected = today.TodaySamResize(1024, test_resize)(np.asarray(image))
        assert torch.equal(sam(np.asarray(image)), expected) and torch.equal(sam(image), expected)


def test_released_runs_the_test_resize_once_for_both_encoders(dataset, monkeypatch):
    calls = []
    original = TestResize.image
    monkeypatch.setattr(TestResize, "image", lambda self, image: calls.append(image.size) or original(self, image))
    sam, clip = SamResize(1024, TestResize()), ClipPreprocess((224, 224), MEAN, STD, "bicubic", "released")
    loaded = ImageReader(dataset, dataset.images[:1], sam, clip)[0]
    assert loaded.sam_pixels is not None and loaded.clip_pixels is not None
    assert calls == [(160, 120)]

"""extract/decode.py on its own: libjpeg-turbo decodes plain JPEGs to exactly PIL's pixels, every
other file goes through load_rgb unchanged, the device resizes stay within a level or two of
PIL's, and the automatic loader workers follow their rule."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot_cache.choices import Preprocessing
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.images import ImageDecodeError, load_rgb
from regionspot_cache.encoders.clip import ClipPreprocess
from regionspot_cache.encoders.preprocess import TestResize
from regionspot_cache.encoders.sam import SamResize
from regionspot_cache.extract.decode import (
    DeviceResize,
    default_loader_workers,
    pixels_of,
    plain_jpeg,
    read_rgb,
    resolve_decode,
)
from tests.helpers import photo_like

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def save(path: Path, image: Image.Image, fmt: str, **kwargs) -> Path:
    image.save(path, fmt, **kwargs)
    return path


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(photo_like(120, 160))


@pytest.mark.parametrize(
    "options",
    [
        {"quality": 90},
        {"quality": 90, "subsampling": "4:4:4"},
        {"quality": 75, "progressive": True},
        {"gray": True},
    ],
)
def test_plain_jpegs_decode_to_exactly_pils_pixels(tmp_path, photo, options):
    options = dict(options)
    image = photo.convert("L") if options.pop("gray", False) else photo
    path = save(tmp_path / "photo.jpg", image, "JPEG", **options)
    assert plain_jpeg(path, None) is not None
    np.testing.assert_array_equal(np.asarray(read_rgb(path)), np.asarray(load_rgb(path)))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize(
    "name,write",
    [
        ("photo.png", lambda p, im: save(p, im, "PNG")),
        ("photo.gif", lambda p, im: save(p, im.convert("P"), "GIF")),
        ("photo.webp", lambda p, im: save(p, im, "WEBP", lossless=True)),
        ("sixteen.png", lambda p, im: save(p, Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257), "PNG")),
        ("cmyk.jpg", lambda p, im: save(p, im.convert("CMYK"), "JPEG")),
        ("rotated.jpg", lambda p, im: save(p, im, "JPEG", exif=_exif(6))),
        ("trailing.jpg", lambda p, im: p.write_bytes(_jpeg_bytes(im) + b"trailing bytes") and p),
    ],
)
def test_other_files_take_pils_path_with_todays_pixels(tmp_path, photo, name, write):
    path = write(tmp_path / name, photo)
    assert plain_jpeg(path, None) is None
    np.testing.assert_array_equal(np.asarray(read_rgb(path)), np.asarray(load_rgb(path)))


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_upright_exif_still_takes_the_fast_path(tmp_path, photo):
    path = save(tmp_path / "upright.jpg", photo, "JPEG", exif=_exif(1))
    assert plain_jpeg(path, None) is not None
    np.testing.assert_array_equal(np.asarray(read_rgb(path)), np.asarray(load_rgb(path)))


@pytest.mark.parametrize("content", [b"", b"\xff\xd8 not really a jpeg \xff\xd9", None])
def test_bad_files_fail_with_load_rgbs_message(tmp_path, photo, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # over the pixel limit, checked from the header before decoding
        save(path, photo, "JPEG")
    else:
        path.write_bytes(content)
    limit = 100 if content is None else None
    with pytest.raises(ImageDecodeError) as expected:
        load_rgb(path, limit)
    with pytest.raises(ImageDecodeError) as fast:
        read_rgb(path, limit)
    assert str(fast.value) == str(expected.value)


@pytest.mark.parametrize("preprocess", ["direct", "released"])
def test_device_resizes_stay_within_two_levels_of_pils(photo, preprocess):
    """The device path's torch resizes against the CPU path's PIL ones (not bit-identical: the
    rounding of antialiased uint8 resizes differs on a few pixels in a thousand)."""
    test_resize = TestResize(short_edge=96, max_size=200) if preprocess == "released" else None
    sam, clip = SamResize(256, test_resize), ClipPreprocess((64, 64), MEAN, STD, "bicubic", preprocess)
    resize = DeviceResize.of(sam, clip)
    resize = DeviceResize(resize.sam_long_side, resize.clip_size, resize.clip_mean, resize.clip_std, "bicubic", test_resize)
    pixels = pixels_of(photo)
    sam_levels = (resize.sam_pixels(pixels).int() - sam(np.asarray(photo)).int()).abs()
    assert sam_levels.max() <= 2 and sam_levels.float().mean() < 0.2
    if preprocess == "direct":  # released CLIP input goes through the SAM test resize, compared above
        clip_levels = ((resize.clip_pixels(pixels) - clip(photo)) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
        assert clip_levels.max() <= 2.01


def test_auto_decodes_on_the_device_only_on_cuda_and_never_for_views():
    assert resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode("auto", torch.device("cuda")) == "device"
    assert resolve_decode("device", torch.device("cpu")) == "device"
    assert resolve_decode("device", torch.device("cuda"), with_view=True) == "cpu"
    # released preprocessing keeps PIL's resizes unless the device path is asked for
    assert resolve_decode("auto", torch.device("cuda"), preprocessing=Preprocessing.RELEASED) == "cpu"
    assert resolve_decode("device", torch.device("cuda"), preprocessing=Preprocessing.RELEASED) == "device"


def test_automatic_loader_workers_share_the_cores_among_devices():
    assert ExtractConfig().num_workers is None
    assert default_loader_workers(cores=16, devices=1) == 15
    assert default_loader_workers(cores=64, devices=8) == 7
    assert default_loader_workers(cores=64, devices=1) == 16  # capped
    assert default_loader_workers(cores=2, devices=1) == 1
    assert default_loader_workers(cores=4, devices=8) == 1  # at least one
    assert 1 <= default_loader_workers() <= 16

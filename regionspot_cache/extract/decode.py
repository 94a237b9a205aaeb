"""Image decoding at a GPU's pace (``extract.decode``): libjpeg-turbo for plain JPEGs, on the CPU or on the device.

``cpu``: loader workers decode plain JPEGs with ``torchvision.io.decode_jpeg`` (libjpeg-turbo,
bit-identical to PIL's decoder: same library, same IDCT, same upsampling;
tests/extract/test_fast_decode.py checks it; with Pillow 13, itself on libjpeg-turbo, about as
fast: benchmarks/RESULTS.md); the resizes stay PIL's, since
torchvision's uint8 resizes differ from PIL's by a level or two on a few pixels in a thousand (a
few in a hundred when upsampling). ``device``: workers only read the bytes of plain JPEGs;
``DevicePixels`` decodes them in batches on the encoders' device, then resizes and normalises
there with torch (not bit-identical to PIL: the rounding above, and nvJPEG's decode on CUDA).
Everything that is not a plain JPEG (PNG, GIF, WebP, 16-bit, CMYK, an EXIF rotation, trailing
bytes, over the pixel limit, unreadable) goes through ``data/images.load_rgb`` as before, so
its pixels and its error messages are unchanged.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from regionspot_cache.config import Decode, Preprocessing
from regionspot_cache.data.images import load_rgb
from regionspot_cache.encoders.preprocess import TestResize, test_resize_for
from regionspot_cache.runtime.devices import usable_cpus

MAX_AUTO_WORKERS = 16
EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}

log = logging.getLogger(__name__)


def resolve_decode(
    decode: Decode | str, device: torch.device, with_view: bool = False, preprocessing: Preprocessing | None = None
) -> Decode:
    """``auto`` -> ``device`` on CUDA (but ``cpu`` for ``released`` preprocessing), else ``cpu``;
    a view cache always decodes on the CPU (its flips and crops work on PIL images)."""
    return Decode.parse(decode, "extract.decode").resolved(device.type, with_view, preprocessing)


def default_loader_workers(cores: int | None = None, devices: int | None = None) -> int:
    """Loader workers per extracting process: the cores this process may use, shared among the
    devices of the machine (one extracting process each), less one for the process that drives its
    device; at least 1, at most ``MAX_AUTO_WORKERS``."""
    cores = usable_cpus() if cores is None else cores
    devices = max(torch.cuda.device_count(), 1) if devices is None else max(devices, 1)
    return min(MAX_AUTO_WORKERS, max(1, cores // devices - 1))


@dataclass(frozen=True)
class JpegFile:
    """The bytes of a plain JPEG: 8-bit RGB or grayscale, upright, within the pixel limit."""

    data: bytes
    size: tuple[int, int]  # (width, height), from the header

    def tensor(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8)


def plain_jpeg(path: Path, max_pixels: int | None) -> JpegFile | None:
    """The file's bytes when libjpeg-turbo decodes it exactly as ``load_rgb`` would, else None
    (then ``load_rgb`` decodes it, or names what is wrong with it). Only the header is parsed."""
    try:
        data = Path(path).read_bytes()
        if not data.rstrip(b"\x00").endswith(JPEG_END):  # truncated, or bytes after the image
            return None
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if max_pixels is not None and image.width * image.height > max_pixels:
                return None
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None
            return JpegFile(data, image.size)
    except Exception:  # noqa: BLE001 - any trouble: load_rgb decodes it or reports it as today
        return None


def read_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    """``load_rgb``'s image, decoded by libjpeg-turbo when the file is a plain JPEG."""
    jpeg = plain_jpeg(path, max_pixels)
    if jpeg is not None:
        try:
            pixels = decode_jpeg(jpeg.tensor(), mode=ImageReadMode.RGB)
            return Image.fromarray(pixels.permute(1, 2, 0).numpy())
        except RuntimeError:
            pass  # a corrupt stream: PIL decodes what it can or says why not, as today
    return load_rgb(path, max_pixels)


def pixels_of(image: Image.Image) -> torch.Tensor:
    """HWC PIL image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class DeviceResize:
    """The resizes and normalisation of ``SamResize`` and ``ClipPreprocess`` as torch operations
    on (3, H, W) uint8 tensors on any device. ``test_resize``: detectron2's, first (``released``)."""

    sam_long_side: int | None  # None: no SAM input (a cache that borrows SAM-less runs)
    clip_size: tuple[int, int] | None  # (height, width); None: no CLIP input
    clip_mean: torch.Tensor | None = None  # (3, 1, 1)
    clip_std: torch.Tensor | None = None
    clip_interpolation: str = "bicubic"
    test_resize: TestResize | None = None

    @classmethod
    def of(cls, sam_resize, clip_preprocess) -> DeviceResize:
        """From the CPU path's ``SamResize`` and ``ClipPreprocess`` (either may be None)."""
        clip = clip_preprocess
        test_resize = sam_resize.test_resize if sam_resize is not None else test_resize_for(clip.preprocess)
        return cls(
            sam_resize.long_side if sam_resize is not None else None,
            tuple(clip.size) if clip is not None else None,
            torch.tensor(clip.mean).view(3, 1, 1) if clip is not None else None,
            torch.tensor(clip.std).view(3, 1, 1) if clip is not None else None,
            clip.interpolation if clip is not None else "bicubic",
            test_resize,
        )

    def sam_pixels(self, image: torch.Tensor) -> torch.Tensor:
        image = self._test_resized(image)
        shape = ResizeLongestSide.get_preprocess_shape(image.shape[1], image.shape[2], self.sam_long_side)
        # ResizeLongestSide.apply_image: torchvision's resize of a PIL image, bilinear by default
        return _resize_uint8(image, shape, InterpolationMode.BILINEAR)

    def clip_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """``direct``: resize the uint8 image (antialiased, as PIL), then [0, 1] and mean/std;
        ``released``: the test-resized image in [0, 1], bilinear resize without antialias."""
        mean, std = self.clip_mean.to(image.device), self.clip_std.to(image.device)
        if self.test_resize is None:
            resized = _resize_uint8(image, self.clip_size, _INTERPOLATION[self.clip_interpolation])
            return (resized.float() / 255.0 - mean) / std
        pixels = self._test_resized(image).float() / 255.0
        pixels = F.resize(pixels, list(self.clip_size), interpolation=InterpolationMode.BILINEAR, antialias=False)
        return (pixels - mean) / std

    def _test_resized(self, image: torch.Tensor) -> torch.Tensor:
        if self.test_resize is None:
            return image
        return _resize_uint8(image, self.test_resize.shape(image.shape[1], image.shape[2]), InterpolationMode.BILINEAR)


def _resize_uint8(image: torch.Tensor, shape: tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    return F.resize(image, list(shape), interpolation=interpolation, antialias=True)


class DevicePixels:
    """The ``device`` path's last step, in the extracting process: decode the JPEG bytes of a batch
    of loaded images on ``device`` in one call, then resize and normalise there. Images the
    workers decoded (non-JPEGs) and failed ones pass through unchanged."""

    def __init__(self, resize: DeviceResize, device: torch.device, with_sam: bool = True, with_clip: bool = True):
        self.resize = resize
        self.device = device
        self.with_sam = with_sam
        self.with_clip = with_clip

    def __call__(self, batch: Sequence) -> list:
        encoded = [i for i, item in enumerate(batch) if item.jpeg is not None and not item.error]
        batch = list(batch)
        for i, decoded in zip(encoded, self._decode([batch[i].jpeg for i in encoded], [batch[i] for i in encoded])):
            item = batch[i]
            if isinstance(decoded, str):
                batch[i] = replace(item, jpeg=None, error=decoded)
                continue
            batch[i] = replace(
                item,
                jpeg=None,
                sam_pixels=self.resize.sam_pixels(decoded) if self.with_sam else None,
                clip_pixels=self.resize.clip_pixels(decoded) if self.with_clip else None,
            )
        return batch

    def _decode(self, data: list[torch.Tensor], items: Sequence) -> list[torch.Tensor | str]:
        """Decoded (3, H, W) uint8 tensors on the device, or for a stream that does not decode, why."""
        if not data:
            return []
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            return [self._decode_one(tensor, item) for tensor, item in zip(data, items)]  # find the bad one

    def _decode_one(self, data: torch.Tensor, item) -> torch.Tensor | str:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as err:
            log.warning("image %s: %s", item.entry.id, err)
            return f"{item.entry.file_name}: cannot decode image: {err}"


def device_pixels(encoders, config, with_clip: bool = True, with_sam: bool = True, view=None) -> Callable[[list], list]:
    """The step between loader and mapper: ``DevicePixels`` when ``config.decode`` resolves to
    ``device`` (``image_loader`` then hands over JPEG bytes), else nothing to do."""
    device = encoders.sam.device
    if not resolve_decode(config.decode, device, view is not None, config.preprocess).on_device:
        return list
    resize = DeviceResize.of(encoders.sam.resizer() if with_sam else None, encoders.clip.preprocessor() if with_clip else None)
    return DevicePixels(resize, device, with_sam, with_clip)

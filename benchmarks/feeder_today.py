"""The loader's preprocessing as it was before issue 26 (commit 6c17f95), kept verbatim as the
baseline of ``benchmarks/feeder.py`` (``today``) and as the reference the current code must equal
bit for bit (tests/extract/test_fast_decode.py). In it, ``released`` ran detectron2's test resize
twice (once for SAM, once for CLIP), and every step went numpy -> PIL -> numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from regionspot_cache.encoders.preprocess import TestResize
from regionspot_cache.extract.reader import ImageReader

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class TodaySamResize:
    long_side: int = 1024
    test_resize: TestResize | None = None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.test_resize is not None:
            image = self.test_resize.array(image)
        resized = ResizeLongestSide(self.long_side).apply_image(image)
        return torch.as_tensor(resized).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class TodayClipPreprocess:
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    released: bool = False

    def __call__(self, image: Image.Image) -> torch.Tensor:
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        if self.released:
            resized = TestResize().array(np.asarray(image.convert("RGB")))
            pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
            pixels = resize(pixels, list(self.size), interpolation=InterpolationMode.BILINEAR, antialias=False)
            return (pixels - mean) / std
        height, width = self.size
        resized = image.convert("RGB").resize((width, height), resample=_INTERPOLATION[self.interpolation])
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - mean) / std


def today_preprocessors(sam_resize, clip_preprocess) -> tuple[TodaySamResize, TodayClipPreprocess]:
    """The old implementations of the current ``SamResize`` and ``ClipPreprocess``."""
    clip = clip_preprocess
    released = clip.test_resize is not None
    return TodaySamResize(sam_resize.long_side, sam_resize.test_resize), TodayClipPreprocess(
        tuple(clip.size), tuple(clip.mean), tuple(clip.std), clip.interpolation, released
    )


class TodayReader(ImageReader):
    """``ImageReader`` with the old preprocessing: CLIP's, then SAM's on ``np.asarray(image)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sam_resize, self.clip_preprocess = today_preprocessors(self.sam_resize, self.clip_preprocess)

    def encoder_inputs(self, image: Image.Image) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        clip_pixels = self.clip_preprocess(image) if self.clip_preprocess else None
        sam_pixels = self.sam_resize(np.asarray(image)) if self.sam_resize else None
        return sam_pixels, clip_pixels

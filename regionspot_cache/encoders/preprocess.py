"""The steps of the image and box preprocessing choices (``extract.preprocess``: ``choices.Preprocessing``).

``direct``: SAM gets ``ResizeLongestSide(1024)`` of the decoded image and CLIP a PIL resize of it
to the model's size (our original path). ``released``: the released RegionSpot evaluation, step by
step: detectron2's test resize first (shortest edge 800, longest at most 1333, PIL bilinear on
uint8), then SAM's ``ResizeLongestSide(1024)`` of that image, and for CLIP that image as a float
tensor in [0, 1] resized with ``torchvision.transforms.functional.resize`` (bilinear, antialias
off: the released code predates torchvision 0.17, which turned the tensor default on) and
normalised; boxes are scaled from the original to the test-resized image before SAM's transform.
Everything here holds no model, so data-loading workers can run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from regionspot_cache.choices import Preprocessing

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class TestResize:
    """detectron2's ``ResizeShortestEdge`` at test time (one short edge, a cap on the long one)."""

    __test__ = False  # not a pytest test class, despite its name

    short_edge: int = 800
    max_size: int = 1333

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """(new height, new width): scale the short edge to ``short_edge``, then shrink if the long
        edge exceeds ``max_size``; rounded half up, as detectron2 rounds."""
        scale = self.short_edge / min(height, width)
        new_h, new_w = (self.short_edge, scale * width) if height < width else (scale * height, self.short_edge)
        if max(new_h, new_w) > self.max_size:
            shrink = self.max_size / max(new_h, new_w)
            new_h, new_w = new_h * shrink, new_w * shrink
        return int(new_h + 0.5), int(new_w + 0.5)

    def image(self, image: Image.Image) -> Image.Image:
        height, width = self.shape(image.height, image.width)
        return image.resize((width, height), resample=Image.BILINEAR)

    def array(self, rgb: np.ndarray) -> np.ndarray:
        return np.asarray(self.image(Image.fromarray(rgb)))

    def boxes(self, boxes_xyxy: torch.Tensor, original_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Boxes in original pixels -> boxes in the test-resized image, and that image's (h, w)."""
        height, width = original_size
        new_h, new_w = self.shape(height, width)
        factors = torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float64)
        return (boxes_xyxy.double() * factors).to(boxes_xyxy.dtype), (new_h, new_w)


def test_resize_for(preprocessing: Preprocessing | str) -> TestResize | None:
    """detectron2's test resize, run before SAM's and CLIP's own (``released``), or None."""
    return TestResize() if Preprocessing.parse(preprocessing, "preprocess").runs_test_resize else None


def clip_pixels(
    preprocessing: Preprocessing | str,
    image: Image.Image,
    size: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    interpolation: str,
) -> torch.Tensor:
    """(3, H, W) normalised CLIP input of ``image`` at ``size`` (height, width), as ``preprocessing`` makes it."""
    if Preprocessing.parse(preprocessing, "preprocess").runs_test_resize:
        return released_clip_pixels(image, size, mean, std)
    return direct_clip_pixels(image, size, mean, std, interpolation)


def direct_clip_pixels(
    image: Image.Image, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor, interpolation: str
) -> torch.Tensor:
    """The ``direct`` CLIP input: a PIL resize of the image to ``size`` (no crop) -> [0, 1] -> mean/std."""
    height, width = size
    resized = rgb(image).resize((width, height), resample=_INTERPOLATION[interpolation])
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - mean) / std


def released_clip_pixels(image: Image.Image, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The released CLIP input: test-resized uint8 -> float in [0, 1] -> bilinear tensor resize
    (antialias off) -> mean/std."""
    return released_clip_of_test_resized(TestResize().image(rgb(image)), size, mean, std)


def released_clip_of_test_resized(
    image: Image.Image, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """``released_clip_pixels`` after its test resize (the loader runs that resize once for SAM
    and CLIP). The float image keeps the HWC memory order of the uint8 one, as it always had:
    torch's bilinear kernel for that order is the one whose rounding the cached features carry."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
    pixels = resize(pixels, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
    return (pixels - mean) / std


def rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode, without the copy ``convert`` makes of an image already in it."""
    return image if image.mode == "RGB" else image.convert("RGB")


def chw_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) contiguous uint8 tensor of an RGB image: PIL writes each band's plane itself,
    about a third of the cost of HWC array -> permute -> contiguous (same bytes)."""
    if image.mode != "RGB":
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    planes = [np.frombuffer(image.tobytes("raw", band), np.uint8) for band in "RGB"]
    return torch.from_numpy(np.concatenate(planes).reshape(3, image.height, image.width))

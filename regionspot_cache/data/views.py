"""Augmented views of an image: horizontal flips and random crops, seeded per image.

Views are named as ``view_specs.py`` describes (``hflip``, ``crop:LO-HI[xN]``, ...; the names and
their grammar are a leaf that ``config`` checks recipes with, re-exported here). Where a view
crops an image is a pure function of (view id, seed, image id), so re-extracting, resuming or
repairing a view gives the same crop.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from regionspot_cache.data.boxes import split_boxes
from regionspot_cache.data.datasets import BoxSet, ImageEntry
from regionspot_cache.view_specs import IDENTITY, View, parse_views, view_by_id  # noqa: F401

MIN_INSIDE_PX = 1.0  # a box with less than this width or height inside the crop is dropped


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view puts one image: flipped or not, then the crop window (in the flipped image)."""

    flip: bool
    left: int
    top: int
    width: int
    height: int


@dataclass
class ViewedImage:
    """An image seen through a view; ``dropped`` are the given boxes that the crop leaves out."""

    image: Image.Image
    entry: ImageEntry  # the view's size
    boxes: BoxSet  # in view pixels, clipped to the view
    dropped: BoxSet  # as given, in the image's pixels
    dropped_reasons: list[str]


def view_geometry(view: View, seed: int, image_id: int, width: int, height: int) -> ViewGeometry:
    """The view's flip and crop window for one image: a pure function of (view id, seed, image id, size)."""
    if view.crop is None:
        return ViewGeometry(view.flip, 0, 0, width, height)
    rng = np.random.default_rng([seed, zlib.crc32(view.id.encode()), image_id])
    lo, hi = view.crop
    crop_w = max(1, min(width, round(width * rng.uniform(lo, hi))))
    crop_h = max(1, min(height, round(height * rng.uniform(lo, hi))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return ViewGeometry(view.flip, left, top, crop_w, crop_h)


def apply_view(view: View, seed: int, image: Image.Image, entry: ImageEntry, boxes: BoxSet) -> ViewedImage:
    """The image and its boxes seen through ``view``. Degenerate boxes keep the reasons
    ``split_boxes`` gives them; boxes the crop leaves out are dropped with a reason naming the view."""
    geometry = view_geometry(view, seed, entry.id, entry.width, entry.height)
    valid, rejected, reasons = split_boxes(boxes, entry.width, entry.height)
    canvas = tv_tensors.BoundingBoxes(
        torch.from_numpy(np.asarray(valid.xyxy, np.float32).reshape(-1, 4)),
        format="XYXY",
        canvas_size=(entry.height, entry.width),
    )
    if geometry.flip:
        image, canvas = F.horizontal_flip(image), F.horizontal_flip(canvas)
    if view.crop is not None:  # torchvision clamps boxes to the crop window
        image = F.crop(image, geometry.top, geometry.left, geometry.height, geometry.width)
        canvas = F.crop(canvas, geometry.top, geometry.left, geometry.height, geometry.width)
    xyxy = canvas.as_subclass(torch.Tensor).numpy().astype(np.float32)
    inside = ((xyxy[:, 2] - xyxy[:, 0]) >= MIN_INSIDE_PX) & ((xyxy[:, 3] - xyxy[:, 1]) >= MIN_INSIDE_PX)
    outside = ~inside
    dropped = BoxSet.concat([rejected, valid.take(outside)])
    reasons = reasons + [f"outside view {view.id}"] * int(outside.sum())
    kept = BoxSet(xyxy[inside], valid.category_ids[inside], valid.scores[inside])
    viewed = ImageEntry(entry.id, entry.file_name, geometry.width, geometry.height)
    return ViewedImage(image, viewed, kept, dropped, reasons)

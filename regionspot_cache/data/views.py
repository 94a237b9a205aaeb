"""Augmented views of an image: horizontal flips and random crops, seeded per image.

A view is named in a recipe (``extract.views``) with this syntax, one spec per list item:

    identity                the image as it is (the base cache itself)
    hflip                   flipped left-right
    crop:LO-HI[xN]          N crops (default 1) whose sides are LO..HI of the image's (0 < LO <= HI <= 1)
    hflip+crop:LO-HI[xN]    flipped, then cropped

A spec with ``xN`` expands to N views (``crop-0.6-1.0-0``, ``crop-0.6-1.0-1``, ...). Where a
view crops an image is a pure function of (view id, seed, image id), so re-extracting, resuming
or repairing a view gives the same crop.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from regionspot_cache.config import VIEW_MODES, ConfigError  # noqa: F401 (VIEW_MODES: released | consistent)
from regionspot_cache.data.boxes import split_boxes
from regionspot_cache.data.datasets import BoxSet, ImageEntry
from regionspot_cache.errors import CacheFormatError

IDENTITY = "identity"
MIN_INSIDE_PX = 1.0  # a box with less than this width or height inside the crop is dropped
_SPEC = re.compile(r"^(?P<flip>hflip)?(?:\+?crop:(?P<lo>[0-9.]+)-(?P<hi>[0-9.]+)(?:x(?P<n>[0-9]+))?)?$")


@dataclass(frozen=True)
class View:
    """One concrete view: flip or not, then a crop whose sides are ``crop`` (lo, hi) of the image's."""

    id: str
    flip: bool = False
    crop: tuple[float, float] | None = None

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.crop is None


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


def parse_views(specs: list[str], where: str = "extract.views") -> list[View]:
    """The concrete views the specs name, identity left out (it is the base cache); a ConfigError
    names a spec that does not parse."""
    views: dict[str, View] = {}
    for i, spec in enumerate(specs):
        for view in _parse_spec(spec.strip(), f"{where}[{i}]"):
            views.setdefault(view.id, view)
    return list(views.values())


def _parse_spec(spec: str, where: str) -> list[View]:
    if spec == IDENTITY:
        return []
    match = _SPEC.match(spec)
    if not spec or not match:
        raise ConfigError(f"{where}: {spec!r} is not a view; use identity, hflip, crop:LO-HI[xN] or hflip+crop:LO-HI[xN] "
                          "(e.g. crop:0.6-1.0x2)")
    flip = match["flip"] is not None
    if match["lo"] is None:
        return [View("hflip", flip=True)]
    try:
        lo, hi, count = float(match["lo"]), float(match["hi"]), int(match["n"] or 1)
    except ValueError:
        raise ConfigError(f"{where}: {spec!r}: crop sizes must be numbers, e.g. crop:0.6-1.0") from None
    if not 0 < lo <= hi <= 1 or count < 1:
        raise ConfigError(f"{where}: {spec!r}: need 0 < LO <= HI <= 1 and at least one crop")
    prefix = "hflip+" if flip else ""
    return [View(f"{prefix}crop-{lo:g}-{hi:g}-{k}", flip, (lo, hi)) for k in range(count)]


def view_by_id(view_id: str) -> View:
    """The view a cache recorded by its id (the inverse of the ids ``parse_views`` makes)."""
    match = re.fullmatch(r"(?P<flip>hflip)?\+?(?:crop-(?P<lo>[0-9.]+)-(?P<hi>[0-9.]+)-[0-9]+)?", view_id)
    if view_id == IDENTITY:
        return View(IDENTITY)
    if not view_id or not match:
        raise CacheFormatError(f"{view_id!r} is not a view id")
    crop = (float(match["lo"]), float(match["hi"])) if match["lo"] else None
    return View(view_id, match["flip"] is not None, crop)


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
    canvas = tv_tensors.BoundingBoxes(torch.from_numpy(np.asarray(valid.xyxy, np.float32).reshape(-1, 4)),
                                      format="XYXY", canvas_size=(entry.height, entry.width))
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

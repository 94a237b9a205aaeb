"""The names of augmented views: the grammar of ``extract.views`` and the ids caches record.

A view is named in a recipe (``extract.views``) with this syntax, one spec per list item:

    identity                the image as it is (the base cache itself)
    hflip                   flipped left-right
    crop:LO-HI[xN]          N crops (default 1) whose sides are LO..HI of the image's (0 < LO <= HI <= 1)
    hflip+crop:LO-HI[xN]    flipped, then cropped

A spec with ``xN`` expands to N views (``crop-0.6-1.0-0``, ``crop-0.6-1.0-1``, ...). Where a
view crops an image is a pure function of (view id, seed, image id), so re-extracting, resuming
or repairing a view gives the same crop (``data/views.py`` applies views to images).

A leaf beside ``config``, which checks a recipe's view specs with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from regionspot_cache.errors import CacheFormatError, ConfigError

IDENTITY = "identity"
MAX_CROPS = 100
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
        raise ConfigError(
            f"{where}: {spec!r} is not a view; use identity, hflip, crop:LO-HI[xN] or hflip+crop:LO-HI[xN] (e.g. crop:0.6-1.0x2)"
        )
    flip = match["flip"] is not None
    if match["lo"] is None:
        return [View("hflip", flip=True)]
    try:
        lo, hi, count = float(match["lo"]), float(match["hi"]), int(match["n"] or 1)
    except ValueError:
        raise ConfigError(f"{where}: {spec!r}: crop sizes must be numbers, e.g. crop:0.6-1.0") from None
    if not 0 < lo <= hi <= 1 or count < 1:
        raise ConfigError(f"{where}: {spec!r}: need 0 < LO <= HI <= 1 and at least one crop")
    if count > MAX_CROPS:  # checked before the views are listed: xN of 10**20 would fill memory
        raise ConfigError(f"{where}: {spec!r}: at most {MAX_CROPS} crops per spec (each view is a cache of its own)")
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

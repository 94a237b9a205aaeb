"""The views a training cache offers (``rs-cache extract`` with ``extract.views``), and which one
each (image, epoch) is read through: a pure function of (seed, source, epoch, index), so resumed
and DDP runs read exactly the views an uninterrupted single-process run would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from regionspot_cache.cache import CacheReader, view_caches
from regionspot_cache.data.views import IDENTITY
from regionspot_cache.errors import CacheFormatError

VIEW_STREAM = 0x71E5  # keeps the view draw apart from the box-capping draw of the same key


@dataclass
class CachedView:
    """One view of a training cache: where its feature maps are, and where its boxes, labels and
    SAM tokens are (the base cache for the identity and for ``released`` views)."""

    name: str
    maps: CacheReader
    boxes: CacheReader


def open_views(base: CacheReader, wanted: Sequence[str]) -> list[CachedView]:
    """The identity and the view caches of ``base`` named in ``wanted`` (empty: all it has)."""
    available = view_caches(base.root)
    names = list(wanted) or [IDENTITY, *available]
    unknown = [name for name in names if name != IDENTITY and name not in available]
    if unknown:
        raise CacheFormatError(
            f"{base.location}: train.views names {unknown}, but the cache has views "
            f"{[IDENTITY, *available]} (extract them with extract.views)"
        )
    return [
        CachedView(IDENTITY, base, base) if name == IDENTITY else _open_view(base, name, available[name])
        for name in dict.fromkeys(names)
    ]


def _open_view(base: CacheReader, name: str, root: Path) -> CachedView:
    reader = CacheReader(root)
    view, provenance = reader.provenance.kind.view, base.provenance
    if view is None or (reader.provenance.dataset, reader.provenance.clip) != (provenance.dataset, provenance.clip):
        raise CacheFormatError(
            f"{reader.location}: not a view cache of {base.location} (another dataset or CLIP, or no view recorded)"
        )
    return CachedView(name, reader, reader if view.mode.has_own_boxes else base)


def pick_view(candidates: Sequence[int], seed: int, source: int, epoch: int, index: int) -> int:
    """The view (among ``candidates``, indices into the views) that image ``index`` is read
    through in ``epoch``; with one candidate no random number is drawn."""
    if len(candidates) == 1:
        return candidates[0]
    rng = np.random.default_rng([seed, source, epoch, index, VIEW_STREAM])
    return candidates[int(rng.integers(len(candidates)))]

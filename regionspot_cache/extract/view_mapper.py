"""Phase 1 mappers of view caches (extract/views.py): which encoders run on a view, and what is kept.

``released``: only CLIP runs on the view; its boxes, labels and SAM tokens are the base cache's.
``consistent``: SAM and CLIP run on the view and its transformed boxes; boxes the crop leaves out
are recorded with the rejected ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from regionspot_cache.cache import ImageFeatures
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import BoxSet
from regionspot_cache.data.views import view_by_id
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.extract.mapper import FeatureMapper, _non_finite, _to_float16
from regionspot_cache.extract.reader import LoadedImage
from regionspot_cache.identity import ViewIdentity


def view_loading(view: ViewIdentity | None) -> dict[str, Any]:
    """``image_loader`` arguments for a cache of ``view`` (none for an ordinary cache)."""
    if view is None:
        return {}
    return {"view": (view_by_id(view.id), view.seed), "with_sam": view.mode.runs_sam}


def view_mapper(encoders: FrozenEncoders, config: ExtractConfig, view: ViewIdentity) -> FeatureMapper:
    return ConsistentViewMapper(encoders, config) if view.mode.runs_sam else ClipOnlyMapper(encoders, config)


class ConsistentViewMapper(FeatureMapper):
    """SAM and CLIP on the view; the boxes its crop left out join the rejected ones, with their reason."""

    def __call__(self, batch: Sequence[LoadedImage]) -> list[ImageFeatures]:
        results = super().__call__(batch)
        for item, result in zip(batch, results):
            if item.dropped_reasons and not item.error:
                result.rejected_boxes = BoxSet.concat([item.dropped, result.rejected_boxes])
                result.rejected_reasons = item.dropped_reasons + result.rejected_reasons
        return results


class ClipOnlyMapper(FeatureMapper):
    """CLIP on the view alone: a released-mode view cache stores feature maps and no boxes."""

    def __call__(self, batch: Sequence[LoadedImage]) -> list[ImageFeatures]:
        good = [item for item in batch if not item.error]
        results = {item.entry.id: self._failed(item) for item in batch if item.error}
        if good:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                maps = self.encoders.clip.feature_maps(torch.stack([item.clip_pixels for item in good]))
            no_tokens = torch.zeros(0, self.encoders.sam_provenance().token_dim)
            for item, feature_map in zip(good, maps):
                problem = _non_finite(feature_map, no_tokens)
                if problem:
                    results[item.entry.id] = self._failed(replace(item, error=problem))
                    continue
                entry = item.entry
                results[entry.id] = ImageFeatures(
                    entry.id,
                    entry.file_name,
                    entry.width,
                    entry.height,
                    feature_map=_to_float16(feature_map),
                    box_tokens=_to_float16(no_tokens),
                )
        return [results[item.entry.id] for item in batch]

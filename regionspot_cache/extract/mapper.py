"""Phase 1 mapper: SAM and CLIP on a batch of loaded images (bf16 on CUDA), guarded against non-finite output."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from regionspot_cache.cache import ImageFeatures
from regionspot_cache.cache.format import STATUS_FAILED
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.boxes import split_boxes
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.extract.reader import LoadedImage

NO_BOXES = "no boxes"  # kept (its feature map serves later proposals), with this reason


class FeatureMapper:
    """Runs SAM and CLIP on a batch of loaded images (SAM only when ``with_clip`` is False: for a
    proposals cache that borrows the feature maps of another cache)."""

    def __init__(self, encoders: FrozenEncoders, config: ExtractConfig, with_clip: bool = True):
        self.encoders = encoders
        self.config = config
        self.with_clip = with_clip
        self.device = encoders.sam.device

    def __call__(self, batch: Sequence[LoadedImage]) -> list[ImageFeatures]:
        good = [item for item in batch if not item.error]
        results = {item.entry.id: self._failed(item) for item in batch if item.error}
        if good:
            # bf16 on CUDA (tensor cores); fp32 on the CPU, where autocast would only slow down.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                embeddings = self.encoders.sam.embed_images([item.sam_pixels for item in good])
                maps = (self.encoders.clip.feature_maps(torch.stack([item.clip_pixels for item in good]))
                        if self.with_clip else [None] * len(good))
                for item, embedding, feature_map in zip(good, embeddings, maps):
                    boxes, rejected, reasons = split_boxes(item.boxes, item.entry.width, item.entry.height)
                    tokens = self.encoders.sam.box_tokens(
                        embedding, boxes.xyxy, (item.entry.height, item.entry.width),
                        self.config.boxes_per_decoder_call,
                    )
                    problem = _non_finite(feature_map, tokens)
                    if problem:  # never let NaN/Inf into the cache: it would poison training
                        results[item.entry.id] = self._failed(replace(item, error=problem))
                        continue
                    results[item.entry.id] = ImageFeatures(
                        item.entry.id, item.entry.file_name, item.entry.width, item.entry.height, boxes,
                        feature_map=None if feature_map is None else _to_float16(feature_map),
                        box_tokens=_to_float16(tokens),
                        rejected_boxes=rejected, rejected_reasons=reasons,
                        reason="" if len(boxes) else NO_BOXES,
                    )
        return [results[item.entry.id] for item in batch]

    @staticmethod
    def _failed(item: LoadedImage) -> ImageFeatures:
        entry = item.entry
        return ImageFeatures(entry.id, entry.file_name, entry.width, entry.height, status=STATUS_FAILED, reason=item.error)


def _non_finite(feature_map: torch.Tensor | None, tokens: torch.Tensor) -> str:
    """Why the encoder outputs of an image cannot be cached, or "" if they can. Checked after
    the float16 cast too: values beyond 65504 overflow to infinity there."""
    for name, values in (("CLIP feature map", feature_map), ("SAM box tokens", tokens)):
        if values is not None and not torch.isfinite(values.float().to(torch.float16)).all():
            return f"non-finite values (NaN or Inf) in the {name}"
    return ""


def _to_float16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy().astype(np.float16)

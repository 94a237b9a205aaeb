"""Phase 1 mapper: SAM and CLIP on a batch of loaded images (bf16 on CUDA), guarded against non-finite output.

A batch is encoded in parts of at most as many images as ``extract.memory_budget_gb`` holds
(``encoders/memory.py``); a part that runs out of memory anyway is run again in halves, and an
image that does not fit alone is recorded as failed, so the shard is still committed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from regionspot_cache.cache import ImageFeatures
from regionspot_cache.cache.format import STATUS_FAILED
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.boxes import split_boxes
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.encoders.memory import (
    GIB,
    FittingBatches,
    images_within,
    is_out_of_memory,
    memory_budget_bytes,
)
from regionspot_cache.extract.reader import LoadedImage

NO_BOXES = "no boxes"  # kept (its feature map serves later proposals), with this reason
OUT_OF_MEMORY = "out of memory encoding this image alone"

log = logging.getLogger(__name__)


class FeatureMapper:
    """Runs SAM and CLIP on a batch of loaded images (SAM only when ``with_clip`` is False: for a
    proposals cache that borrows the feature maps of another cache)."""

    def __init__(self, encoders: FrozenEncoders, config: ExtractConfig, with_clip: bool = True):
        config.validate()
        self.encoders = encoders
        self.config = config
        self.with_clip = with_clip
        self.device = encoders.sam.device
        self.parts = FittingBatches(min(config.batch_size, self._images_in_budget()), self.device)

    def _images_in_budget(self) -> int:
        budget = memory_budget_bytes(self.config.memory_budget_gb, self.device)
        dtype_bytes = 2 if self.device.type == "cuda" else 4  # bf16 autocast on CUDA
        fit = images_within(budget, self.encoders.sam.image_bytes(dtype_bytes))
        if fit < self.config.batch_size:
            log.info(
                "a memory budget of %.1f GB holds %d images of SAM %s: batches of %d run in parts of %d",
                budget / GIB,
                fit,
                self.encoders.spec.sam.variant,
                self.config.batch_size,
                fit,
            )
        return fit

    def __call__(self, batch: Sequence[LoadedImage]) -> list[ImageFeatures]:
        good = [item for item in batch if not item.error]
        results = {item.entry.id: self._failed(item) for item in batch if item.error}
        for item, features in zip(good, self.parts.map(good, self._encode_or_fail)):
            results[item.entry.id] = features
        return [results[item.entry.id] for item in batch]

    def _encode_or_fail(self, items: Sequence[LoadedImage]) -> list[ImageFeatures]:
        """``_encode``; a single image that runs out of memory is recorded as failed (a larger
        part's OOM goes up to ``FittingBatches``, which retries it in halves)."""
        if len(items) > 1:
            return self._encode(items)
        try:
            return self._encode(items)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            log.warning("image %s: %s", items[0].entry.id, OUT_OF_MEMORY)
        return [self._failed(replace(items[0], error=OUT_OF_MEMORY))]

    def _encode(self, items: Sequence[LoadedImage]) -> list[ImageFeatures]:
        results = []
        # bf16 on CUDA (tensor cores); fp32 on the CPU, where autocast would only slow down.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            embeddings = self.encoders.sam.embed_images([item.sam_pixels for item in items])
            maps = (
                self.encoders.clip.feature_maps(torch.stack([item.clip_pixels for item in items]))
                if self.with_clip
                else [None] * len(items)
            )
            for item, embedding, feature_map in zip(items, embeddings, maps):
                boxes, rejected, reasons = split_boxes(item.boxes, item.entry.width, item.entry.height)
                tokens = self.encoders.sam.box_tokens(
                    embedding,
                    boxes.xyxy,
                    (item.entry.height, item.entry.width),
                    self.config.boxes_per_decoder_call,
                )
                problem = _non_finite(feature_map, tokens)
                if problem:  # never let NaN/Inf into the cache: it would poison training
                    results.append(self._failed(replace(item, error=problem)))
                    continue
                results.append(
                    ImageFeatures(
                        item.entry.id,
                        item.entry.file_name,
                        item.entry.width,
                        item.entry.height,
                        boxes,
                        feature_map=None if feature_map is None else _to_float16(feature_map),
                        box_tokens=_to_float16(tokens),
                        rejected_boxes=rejected,
                        rejected_reasons=reasons,
                        reason="" if len(boxes) else NO_BOXES,
                    )
                )
        return results

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

"""The paper's training-free baselines (Table 1): CLIP on box crops, without or with SAM's mask.

``clip-box``: crop each box from the original image, embed the crop with CLIP's own evaluation
preprocessing (open_clip's: resize the shortest side, centre crop, normalise), cosine against the
class text embeddings, softmax with CLIP's logit scale. ``clip-mask``: SAM's single mask for the
box prompt; everything outside it is painted in CLIP's mean colour (zero after normalisation),
then the box is cropped as for clip-box. The logits go through the head's own scoring and
protocol code (``scoring.detections_from_logits``), so the detections compare one for one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from regionspot_cache.cache import CacheReader, Vocabulary
from regionspot_cache.config import EvalConfig, EvalMethod
from regionspot_cache.data.images import ImageSource
from regionspot_cache.encoders import ClipEncoder, FrozenEncoders
from regionspot_cache.evaluate.scoring import Detections, detections_from_logits
from regionspot_cache.head.model import region_logits
from regionspot_cache.progress import progress_bar


def crop_bounds(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Whole-pixel bounds covering the box (outwards), inside the image, at least one pixel."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(math.floor(x1), 0), width - 1)
    top = min(max(math.floor(y1), 0), height - 1)
    right = max(min(math.ceil(x2), width), left + 1)
    bottom = max(min(math.ceil(y2), height), top + 1)
    return left, top, right, bottom


@dataclass
class CropEmbedder:
    """L2-normalised CLIP image embeddings of crops, with the model's own eval preprocessing."""

    clip: ClipEncoder
    batch_size: int = 64
    transform: Callable[[Image.Image], torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        cfg = PreprocessCfg(**self.clip.model.visual.preprocess_cfg)
        self.transform = image_transform_v2(cfg, is_train=False)

    @property
    def mean_colour(self) -> tuple[int, int, int]:
        """The RGB colour that CLIP's normalisation maps to zero."""
        mean = self.clip.model.visual.preprocess_cfg["mean"]
        return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]

    @torch.no_grad()
    def embed(self, crops: list[Image.Image]) -> torch.Tensor:
        batches = [
            torch.stack([self.transform(crop) for crop in crops[start : start + self.batch_size]])
            for start in range(0, len(crops), self.batch_size)
        ]
        return torch.cat([self.clip.model.encode_image(b.to(self.clip.device), normalize=True) for b in batches])


def box_crops(image: Image.Image, boxes: np.ndarray) -> list[Image.Image]:
    return [image.crop(crop_bounds(box, image.width, image.height)) for box in boxes]


def masked_box_crops(
    image: Image.Image, boxes: np.ndarray, encoders: FrozenEncoders, fill: tuple[int, int, int], boxes_per_call: int = 16
) -> list[Image.Image]:
    """Box crops with the pixels outside SAM's mask for the box painted ``fill``."""
    sam = encoders.sam
    pixels = np.asarray(image)
    embedding = sam.embed_images([sam.resizer()(pixels)])[0]
    crops = []
    for start in range(0, len(boxes), boxes_per_call):
        chunk = boxes[start : start + boxes_per_call]
        masks = sam.box_masks(embedding, chunk, pixels.shape[:2], boxes_per_call).cpu().numpy()
        for box, mask in zip(chunk, masks):
            left, top, right, bottom = crop_bounds(box, image.width, image.height)
            region = pixels[top:bottom, left:right].copy()
            region[~mask[top:bottom, left:right]] = fill
            crops.append(Image.fromarray(region))
    return crops


@dataclass
class BaselineScorer:
    """(N, C) logits of a training-free baseline for boxes of one image."""

    method: EvalMethod  # a baseline: clip-box or clip-mask
    encoders: FrozenEncoders
    text: torch.Tensor  # (C, text_dim) class text embeddings, L2-normalised
    embedder: CropEmbedder = field(init=False)

    def __post_init__(self) -> None:
        method = EvalMethod.find(self.method)
        if method is None or not method.reads_images:
            baselines = [m.value for m in EvalMethod if m.reads_images]
            raise ValueError(f"unknown baseline {self.method!r}; known: {', '.join(baselines)}")
        self.method = method
        self.embedder = CropEmbedder(self.encoders.clip)

    def logits(self, image: Image.Image, boxes: np.ndarray) -> torch.Tensor:
        """CLIP logit scale x cosine(crop embedding, class text embedding), plus the logit bias of SigLIP-style models."""
        if self.method.masks_crops:
            crops = masked_box_crops(image, boxes, self.encoders, self.embedder.mean_colour)
        else:
            crops = box_crops(image, boxes)
        return region_logits(self.embedder.embed(crops), self.text, self.encoders.clip.logit_scale, self.encoders.clip.logit_bias)


def score_cache_with_baseline(
    reader: CacheReader,
    vocab: Vocabulary,
    config: EvalConfig,
    method: EvalMethod,
    encoders: FrozenEncoders,
    images: ImageSource,
) -> Detections:
    """Detections of ``method`` for the cache's boxes (ground truth or proposals), under
    ``config``'s scoring protocol: from the logits on, the head's own code path."""
    config.validate()
    scorer = BaselineScorer(method, encoders, torch.from_numpy(vocab.embeddings).to(encoders.clip.device))

    def logits_per_image() -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
        image_ids = reader.image_ids()
        with progress_bar(f"{method} scores", len(image_ids)) as (bar, task):
            for image_id in image_ids:
                item = reader.image(image_id)
                if len(item.boxes):
                    yield image_id, item.boxes, item.scores, scorer.logits(images.load(image_id), item.boxes)
                bar.update(task, advance=1)

    return detections_from_logits(logits_per_image(), vocab.category_ids, config)

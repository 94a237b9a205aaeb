"""Phase 3: score cached boxes against a vocabulary (``evaluate.api`` runs LVIS on them).

Scoring protocols (``EvalConfig.scoring`` / ``.protocol``) are defined in ``scoring.py``; the
default follows the released RegionSpot code: softmax over the vocabulary of each box's logits,
the top ``top_k_per_image`` (box, class) pairs of the flattened box x class matrix, score = box
score x class probability (box score is 1 for ground truth), then LVIS keeps 300 per image.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from regionspot_cache.cache import CachedImage, CacheReader, Vocabulary
from regionspot_cache.config import EvalConfig
from regionspot_cache.evaluate.scoring import Detections, detections_from_logits
from regionspot_cache.head.model import RegionSpotHead, region_logits
from regionspot_cache.progress import progress_bar
from regionspot_cache.regions.open_set import kept_regions
from regionspot_cache.runtime.devices import resolve_device


@torch.no_grad()
def image_logits(
    head: RegionSpotHead,
    item: CachedImage,
    text: torch.Tensor,
    logit_scale: float,
    device: torch.device,
    logit_bias: float | None = None,
) -> torch.Tensor:
    """(boxes, classes) logits of one cached image."""
    tokens = torch.from_numpy(item.tokens.astype(np.float32)).to(device)[None]
    feature_map = torch.from_numpy(item.feature_map.astype(np.float32)).to(device)[None]
    return region_logits(head(tokens, feature_map)[0], text, logit_scale, logit_bias)


def score_cache(
    reader: CacheReader, head: RegionSpotHead, vocab: Vocabulary, config: EvalConfig, background: torch.Tensor | None = None
) -> Detections:
    """Score every cached box of ``reader`` against ``vocab`` with ``head``, under ``config``'s
    scoring and protocol (``scoring.protocol_for``).

    Arguments:
      reader (CacheReader): the cache; its boxes (ground truth or proposals) are scored.
      head (RegionSpotHead): the trained head; moved to ``config.device`` and set to eval mode.
      vocab (Vocabulary): class names, LVIS category ids (C,) and text embeddings (C, text_dim)
        float32, L2-normalised; usually ``reader.vocabulary(dataset name)``.
      config (EvalConfig): scoring (softmax / sigmoid), protocol, device and open-set rejection
        (``config.open_set``: rejected boxes make no detections).
      background (Tensor or None): (P, text_dim) text embeddings of the background prompts, for
        the ``background-prompt`` open-set rule.

    Returns:
      (Detections): columns of D detections in image order (within an image best first under
        the standard protocol, box-major under the fixed one):
        image_ids (D,) int64, category_ids (D,) int64, boxes (D, 4) float32 x, y, w, h in
        original pixels, scores (D,) float64 = box score x class probability.
    """
    config.validate()
    device = resolve_device(config.device)
    head = head.to(device).eval()
    text = torch.from_numpy(vocab.embeddings).to(device)
    logit_scale, logit_bias = reader.provenance.clip.logit_scale, reader.provenance.clip.logit_bias

    def images() -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
        image_ids = reader.image_ids()
        with progress_bar("score boxes", len(image_ids)) as (bar, task):
            for image_id in image_ids:
                item = reader.image(image_id)
                if len(item.boxes):
                    yield rejecting_unknown(image_id, item, head, text, background, (logit_scale, logit_bias), config, device)
                bar.update(task, advance=1)

    return detections_from_logits(images(), vocab.category_ids, config)


def rejecting_unknown(
    image_id: int,
    item: CachedImage,
    head: RegionSpotHead,
    text: torch.Tensor,
    background: torch.Tensor | None,
    logit_scale_bias: tuple[float, float | None],
    config: EvalConfig,
    device: torch.device,
) -> tuple[int, np.ndarray, np.ndarray, torch.Tensor]:
    """One image's (id, boxes, box scores, logits), without the boxes the open-set rule rejects."""
    scale, bias = logit_scale_bias
    if not config.open_set.rule.rejects:
        return image_id, item.boxes, item.scores, image_logits(head, item, text, scale, device, bias)
    extra = background if background is not None else text[:0]
    logits = image_logits(head, item, torch.cat([text, extra.to(device)]), scale, device, bias)
    logits, background_logits = logits[:, : len(text)], logits[:, len(text) :]
    keep = kept_regions(config.open_set.rule.known_scores(logits, background_logits), config.open_set).cpu().numpy()
    return image_id, item.boxes[keep], item.scores[keep], logits[torch.from_numpy(keep).to(logits.device)]

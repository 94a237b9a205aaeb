"""Phase 3: score cached boxes against a vocabulary and evaluate with the official LVIS code.

Scoring protocols (``EvalConfig.scoring`` / ``.protocol``) are defined in ``scoring.py``; the
default follows the released RegionSpot code: softmax over the vocabulary of each box's logits,
the top ``top_k_per_image`` (box, class) pairs of the flattened box x class matrix, score = box
score x class probability (box score is 1 for ground truth), then LVIS keeps 300 per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from regionspot_cache.cache import CachedImage, CacheReader, Vocabulary
from regionspot_cache.config import EvalConfig
from regionspot_cache.evaluate.lvis import EvalResult, lvis_ap
from regionspot_cache.evaluate.scoring import (
    Detections,
    detections_from_logits,
    lvis_max_dets,
    protocol_settings,
    write_results_json,
)
from regionspot_cache.head.model import RegionSpotHead, region_logits
from regionspot_cache.progress import progress_bar
from regionspot_cache.runtime import resolve_device


@torch.no_grad()
def image_logits(
    head: RegionSpotHead, item: CachedImage, text: torch.Tensor, logit_scale: float, device: torch.device
) -> torch.Tensor:
    """(boxes, classes) logits of one cached image."""
    tokens = torch.from_numpy(item.tokens.astype(np.float32)).to(device)[None]
    feature_map = torch.from_numpy(item.feature_map.astype(np.float32)).to(device)[None]
    return region_logits(head(tokens, feature_map)[0], text, logit_scale)


def score_cache(reader: CacheReader, head: RegionSpotHead, vocab: Vocabulary, config: EvalConfig) -> Detections:
    """Detections of every extracted image with boxes, under ``config``'s scoring protocol."""
    config.validate()
    device = resolve_device(config.device)
    head = head.to(device).eval()
    text = torch.from_numpy(vocab.embeddings).to(device)
    logit_scale = reader.provenance.clip.logit_scale

    def images() -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
        image_ids = reader.image_ids()
        with progress_bar("score boxes", len(image_ids)) as (bar, task):
            for image_id in image_ids:
                item = reader.image(image_id)
                if len(item.boxes):
                    yield image_id, item.boxes, item.scores, image_logits(head, item, text, logit_scale, device)
                bar.update(task, advance=1)

    return detections_from_logits(images(), vocab.category_ids, config)


def evaluate_head(
    cache_dir: Path | str,
    head: RegionSpotHead,
    annotation_file: Path | str,
    config: EvalConfig,
    results_file: Path | str | None = None,
    vocabulary: str | None = None,
) -> EvalResult:
    reader = CacheReader(cache_dir)
    vocab = reader.vocabulary(vocabulary or reader.provenance.dataset)
    detections = score_cache(reader, head, vocab, config)
    if results_file is not None:
        results_file = write_results_json(detections, results_file)
    metrics = lvis_ap(annotation_file, detections, lvis_max_dets(config))
    return EvalResult(metrics, len(detections), results_file, None, protocol_settings(config), detections)

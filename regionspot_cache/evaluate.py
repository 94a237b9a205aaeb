"""Phase 3: score cached boxes against a vocabulary and evaluate with the official LVIS code.

Scoring follows the released RegionSpot code: softmax over the vocabulary of each box's logits,
the top ``top_k_per_image`` (box, class) pairs of the flattened box x class matrix, score = box
score x class probability (box score is 1 for ground truth), then LVIS keeps 300 per image.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .cache import CacheReader, CachedImage, Vocabulary
from .config import EvalConfig
from .head import RegionSpotHead, region_logits
from .progress import progress_bar
from .runtime import resolve_device

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    detections: int
    results_file: Path | None


@torch.no_grad()
def score_image(
    head: RegionSpotHead, item: CachedImage, text: torch.Tensor, logit_scale: float, top_k: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (box index, class index, score) of one image."""
    tokens = torch.from_numpy(item.tokens.astype(np.float32)).to(device)[None]
    feature_map = torch.from_numpy(item.feature_map.astype(np.float32)).to(device)[None]
    logits = region_logits(head(tokens, feature_map)[0], text, logit_scale)
    probs = logits.softmax(dim=-1) * torch.tensor(item.scores, device=device)[:, None]
    values, flat = probs.flatten().topk(min(top_k, probs.numel()))
    num_classes = probs.shape[1]
    return (flat // num_classes).cpu().numpy(), (flat % num_classes).cpu().numpy(), values.cpu().numpy()


def predict_detections(reader: CacheReader, head: RegionSpotHead, vocab: Vocabulary, config: EvalConfig) -> list[dict]:
    """LVIS-format detections (bbox as x, y, w, h) for every extracted image with boxes."""
    device = resolve_device(config.device)
    head = head.to(device).eval()
    text = torch.from_numpy(vocab.embeddings).to(device)
    logit_scale = float(reader.provenance.clip["logit_scale"])
    detections: list[dict] = []
    image_ids = reader.image_ids()
    with progress_bar("score boxes", len(image_ids)) as (bar, task):
        for image_id in image_ids:
            item = reader.image(image_id)
            if len(item.boxes):
                boxes, classes, scores = score_image(head, item, text, logit_scale, config.top_k_per_image, device)
                detections.extend(_lvis_records(image_id, item.boxes[boxes], vocab.category_ids[classes], scores))
            bar.update(task, advance=1)
    return detections


def _lvis_records(image_id: int, xyxy: np.ndarray, category_ids: np.ndarray, scores: np.ndarray) -> Iterator[dict]:
    for (x1, y1, x2, y2), category_id, score in zip(xyxy.tolist(), category_ids.tolist(), scores.tolist()):
        yield {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


@contextmanager
def numpy_float_alias() -> Iterator[None]:
    """lvis 0.5.3 calls ``np.float``, which NumPy 1.24 removed; provide it only while LVIS runs."""
    added = not hasattr(np, "float")
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


def lvis_box_ap(annotation_file: Path | str, detections: list[dict], max_dets: int = 300) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l, APr/c/f of ``detections`` with ``lvis.LVISEval`` (box)."""
    from lvis import LVIS, LVISEval, LVISResults

    if not detections:
        return {name: 0.0 for name in METRICS}
    # lvis warns on every in-memory result list that it trusts the format; we built it.
    logging.getLogger("lvis.results").setLevel(logging.ERROR)
    with numpy_float_alias():
        gt = LVIS(str(annotation_file))
        # LVISResults modifies the dicts it is given.
        results = LVISResults(gt, [dict(d) for d in detections], max_dets=max_dets)
        evaluator = LVISEval(gt, results, iou_type="bbox")
        evaluator.run()
    return {name: float(value) for name, value in evaluator.get_results().items() if name in METRICS}


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
    detections = predict_detections(reader, head, vocab, config)
    if results_file is not None:
        results_file = Path(results_file)
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(detections))
    metrics = lvis_box_ap(annotation_file, detections, config.max_dets_per_image)
    return EvalResult(metrics, len(detections), results_file)

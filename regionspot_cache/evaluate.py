"""Phase 3: score cached boxes against a vocabulary and evaluate with the official LVIS code.

Scoring protocols (``EvalConfig.scoring`` / ``.protocol``) are defined in ``scoring.py``; the
default follows the released RegionSpot code: softmax over the vocabulary of each box's logits,
the top ``top_k_per_image`` (box, class) pairs of the flattened box x class matrix, score = box
score x class probability (box score is 1 for ground truth), then LVIS keeps 300 per image.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .cache import CacheReader, CachedImage, Vocabulary
from .config import EvalConfig
from .head import RegionSpotHead, region_logits
from .progress import progress_bar
from .runtime import resolve_device
from .scoring import (
    Detections,
    cap_per_image,
    detections_from_logits,
    lvis_max_dets,
    protocol_settings,
    write_results_json,
)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    detections: int
    results_file: Path | None
    segm_metrics: dict[str, float] | None = None  # mask AP, when masks were predicted
    settings: dict[str, Any] = field(default_factory=dict)  # scoring.protocol_settings
    predictions: Detections | None = None


@torch.no_grad()
def image_logits(
    head: RegionSpotHead, item: CachedImage, text: torch.Tensor, logit_scale: float, device: torch.device
) -> torch.Tensor:
    """(boxes, classes) logits of one cached image."""
    tokens = torch.from_numpy(item.tokens.astype(np.float32)).to(device)[None]
    feature_map = torch.from_numpy(item.feature_map.astype(np.float32)).to(device)[None]
    return region_logits(head(tokens, feature_map)[0], text, logit_scale)


def predict(reader: CacheReader, head: RegionSpotHead, vocab: Vocabulary, config: EvalConfig) -> Detections:
    """Detections of every extracted image with boxes, under ``config``'s scoring protocol."""
    config.validate()
    device = resolve_device(config.device)
    head = head.to(device).eval()
    text = torch.from_numpy(vocab.embeddings).to(device)
    logit_scale = float(reader.provenance.clip["logit_scale"])

    def images() -> Iterator[tuple[int, np.ndarray, np.ndarray, torch.Tensor]]:
        image_ids = reader.image_ids()
        with progress_bar("score boxes", len(image_ids)) as (bar, task):
            for image_id in image_ids:
                item = reader.image(image_id)
                if len(item.boxes):
                    yield image_id, item.boxes, item.scores, image_logits(head, item, text, logit_scale, device)
                bar.update(task, advance=1)

    return detections_from_logits(images(), vocab.category_ids, config)


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


def evaluable(gt: Any, detections: Detections) -> Detections:
    """The detections ``lvis.LVISEval`` looks at: categories annotated in their image or on its
    negative list (the rest it drops unseen). Applied after the per-image cap, this changes no
    AP but spares LVISResults millions of detections (~1% are evaluable on LVIS val)."""
    images = gt.dataset["images"]
    unknown = np.setdiff1d(detections.image_ids, np.array([img["id"] for img in images], np.int64))
    if len(unknown):
        raise ValueError(f"detections for images not in the annotations, e.g. {unknown[:5].tolist()}")
    pairs = [(a["image_id"], a["category_id"]) for a in gt.dataset["annotations"]]
    pairs += [(img["id"], c) for img in images for c in img.get("neg_category_ids", [])]
    allowed = np.array(pairs, np.int64).reshape(-1, 2)
    span = int(max(allowed[:, 1].max(initial=0), detections.category_ids.max(initial=0))) + 1
    keys = detections.image_ids.astype(np.int64) * span + detections.category_ids
    keep = np.isin(keys, allowed[:, 0] * span + allowed[:, 1])
    if not keep.any() and len(detections):
        keep[0] = True  # LVISResults reads results[0]; LVISEval drops this one unseen
    return detections.take(keep)


def run_lvis_eval(gt: Any, detections: list[dict] | Detections, max_dets: int = 300, iou_type: str = "bbox") -> Any:
    """``lvis.LVISEval`` run on ``detections`` against the loaded ``lvis.LVIS`` ``gt``; ``max_dets``
    is LVISResults' per-image cap (-1: none). Call inside ``numpy_float_alias``."""
    from lvis import LVISEval, LVISResults

    # lvis warns on every in-memory result list that it trusts the format; we built it.
    logging.getLogger("lvis.results").setLevel(logging.ERROR)
    if isinstance(detections, Detections):
        records = evaluable(gt, cap_per_image(detections, max_dets)).records()
    else:
        records = [dict(d) for d in detections]  # LVISResults modifies the dicts it is given.
    results = LVISResults(gt, records, max_dets=max_dets)
    evaluator = LVISEval(gt, results, iou_type=iou_type)
    evaluator.params.max_dets = max_dets  # only names the AR keys; -1 says "no cap"
    evaluator.run()
    return evaluator


def lvis_box_ap(
    annotation_file: Path | str, detections: list[dict] | Detections, max_dets: int = 300, iou_type: str = "bbox"
) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l, APr/c/f of ``detections`` with ``lvis.LVISEval`` (box, or
    ``segm`` for records with masks)."""
    from lvis import LVIS

    if not len(detections):
        return {name: 0.0 for name in METRICS}
    with numpy_float_alias():
        evaluator = run_lvis_eval(LVIS(str(annotation_file)), detections, max_dets, iou_type)
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
    detections = predict(reader, head, vocab, config)
    if results_file is not None:
        results_file = write_results_json(detections, results_file)
    metrics = lvis_box_ap(annotation_file, detections, lvis_max_dets(config))
    return EvalResult(metrics, len(detections), results_file, None, protocol_settings(config), detections)


def write_metrics(path: Path | str, result: EvalResult) -> Path:
    """The metrics at the top level, and under ``eval`` the protocol and results file behind them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {**result.settings, "detections": result.detections,
                "results_file": str(result.results_file) if result.results_file else None}
    path.write_text(json.dumps({**result.metrics, "eval": settings}, indent=2))
    return path

"""The official LVIS evaluation (``lvis`` 0.5.3) and the metrics files it yields."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from regionspot_cache.errors import InputError
from regionspot_cache.evaluate.scoring import (
    Detections,
    cap_per_image,
)
from regionspot_cache.runtime.files import write_json

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# The paper's headline: AP over all categories and by LVIS frequency group (name -> group).
FREQUENCY_METRICS = {"AP": "all", "APr": "rare", "APc": "common", "APf": "frequent"}


@dataclass
class EvalResult:
    metrics: dict[str, float]
    num_detections: int
    results_file: Path | None
    segm_metrics: dict[str, float] | None = None  # mask AP, when masks were predicted
    settings: dict[str, Any] = field(default_factory=dict)  # ScoringProtocol.settings()
    detections: Detections | None = None


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
        raise InputError(f"detections for images not in the annotations, e.g. {unknown[:5].tolist()}")
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


def lvis_ap(
    annotations: Path | str | dict, detections: list[dict] | Detections, max_dets: int = 300, iou_type: str = "bbox"
) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l, APr/c/f of ``detections`` with ``lvis.LVISEval`` (box, or
    ``segm`` for records with masks) against an LVIS annotation file or data already read
    (``ground_truth.load_ground_truth``; LVISEval modifies it, so pass each call its own)."""
    from lvis import LVIS

    from regionspot_cache.evaluate.ground_truth import InMemoryLVIS

    if not len(detections):
        return {name: 0.0 for name in METRICS}
    gt = InMemoryLVIS(annotations) if isinstance(annotations, dict) else LVIS(str(annotations))
    with numpy_float_alias():
        evaluator = run_lvis_eval(gt, detections, max_dets, iou_type)
    return {name: float(value) for name, value in evaluator.get_results().items() if name in METRICS}


def write_metrics(path: Path | str, result: EvalResult) -> Path:
    """The metrics at the top level, and under ``eval`` the protocol and results file behind them."""
    settings = {
        **result.settings,
        "detections": result.num_detections,
        "results_file": str(result.results_file) if result.results_file else None,
    }
    return write_json(path, {**result.metrics, "eval": settings}, indent=2)

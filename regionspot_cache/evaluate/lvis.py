"""The official LVIS evaluation (``lvis`` 0.5.3) and the metrics files it yields."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from regionspot_cache.errors import InputError
from regionspot_cache.evaluate.scoring import (
    Detections,
    cap_per_image,
)
from regionspot_cache.runtime.files import write_json

if TYPE_CHECKING:  # ground_truth.py imports lvis, which this module loads only when it evaluates
    from regionspot_cache.evaluate.ground_truth import GroundTruthBoxes
    from regionspot_cache.evaluate.provenance import EvalProvenance

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# The paper's headline: AP over all categories and by LVIS frequency group (name -> group).
FREQUENCY_METRICS = {"AP": "all", "APr": "rare", "APc": "common", "APf": "frequent"}


# LVIS's area ranges (lvis.eval.Params), for the metrics of a run without detections.
AREA_METRICS = {"APs": (0.0, 32.0**2), "APm": (32.0**2, 96.0**2), "APl": (96.0**2, 1e10)}
FREQUENCY_GROUPS = {"APr": "r", "APc": "c", "APf": "f"}

# A metric is None ("n/a" on pages, null in JSON) where nothing can be scored: no ground truth in
# its group. LVIS says -1 there, and an AP of 0.0 would claim a miss that never happened.
Metrics = dict[str, float | None]


@dataclass
class CategoryAP:
    """One category's box AP (LVISEval's precision array, all areas) and what it rests on."""

    category_id: int
    name: str
    frequency: str  # LVIS group: r, c or f (COCO files: f)
    ap: float | None  # None: no ground truth of it in the evaluated images
    gt_instances: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "frequency": self.frequency, "AP": self.ap, "gt_instances": self.gt_instances}


@dataclass
class LvisScores:
    metrics: Metrics
    per_category: list[CategoryAP]


@dataclass
class EvalResult:
    metrics: Metrics
    num_detections: int
    results_file: Path | None
    segm_metrics: Metrics | None = None  # mask AP, when masks were predicted
    settings: dict[str, Any] = field(default_factory=dict)  # ScoringProtocol.settings()
    detections: Detections | None = None
    per_category: list[CategoryAP] = field(default_factory=list)  # box AP per category, in id order
    ground_truth: GroundTruthBoxes | None = None  # the annotated boxes, drawn beside the predictions


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


def lvis_scores(
    annotations: Path | str | dict, detections: list[dict] | Detections, max_dets: int = 300, iou_type: str = "bbox"
) -> LvisScores:
    """AP, AP50, AP75, APs/m/l, APr/c/f and the AP of each category of ``detections`` with
    ``lvis.LVISEval`` (box, or ``segm`` for records with masks) against an LVIS annotation file or
    data already read (``ground_truth.load_ground_truth``; LVISEval modifies it, so pass each call
    its own). Where there is no ground truth to score, the AP is None."""
    from lvis import LVIS

    from regionspot_cache.evaluate.ground_truth import InMemoryLVIS

    gt = InMemoryLVIS(annotations) if isinstance(annotations, dict) else LVIS(str(annotations))
    if not len(detections):
        return without_detections(gt)
    with numpy_float_alias():
        evaluator = run_lvis_eval(gt, detections, max_dets, iou_type)
    metrics = {name: _scored(value) for name, value in evaluator.get_results().items() if name in METRICS}
    precision = evaluator.eval["precision"][:, :, :, 0]  # (IoU thresholds, recalls, categories), area "all"
    aps = [_mean_scored(precision[:, :, k]) for k in range(precision.shape[2])]
    return LvisScores(metrics, _categories(gt, dict(zip(evaluator.params.cat_ids, aps))))


def lvis_ap(
    annotations: Path | str | dict, detections: list[dict] | Detections, max_dets: int = 300, iou_type: str = "bbox"
) -> Metrics:
    """The metrics of ``lvis_scores``: AP, AP50, AP75, APs/m/l, APr/c/f (None: no ground truth)."""
    return lvis_scores(annotations, detections, max_dets, iou_type).metrics


def _scored(value: float) -> float | None:
    return None if value < 0 else float(value)


def _mean_scored(precision: np.ndarray) -> float | None:
    """LVIS's mean over the entries it filled (-1: not scored), None where it filled none."""
    filled = precision[precision > -1]
    return float(filled.mean()) if filled.size else None


def _categories(gt: Any, aps: dict[int, float | None]) -> list[CategoryAP]:
    counts: dict[int, int] = {}
    for annotation in gt.dataset["annotations"]:
        counts[annotation["category_id"]] = counts.get(annotation["category_id"], 0) + 1
    return [
        CategoryAP(int(c["id"]), str(c["name"]), str(c.get("frequency", "f")), aps.get(c["id"]), counts.get(c["id"], 0))
        for c in sorted(gt.dataset["categories"], key=lambda c: c["id"])
    ]


def without_detections(gt: Any) -> LvisScores:
    """No detections: 0.0 wherever there is ground truth to miss, None where there is none."""
    annotations = gt.dataset["annotations"]
    frequency = {c["id"]: c.get("frequency", "f") for c in gt.dataset["categories"]}
    groups = {frequency[a["category_id"]] for a in annotations}
    some = {"AP": bool(annotations), "AP50": bool(annotations), "AP75": bool(annotations)}
    some |= {name: any(low <= a["area"] <= high for a in annotations) for name, (low, high) in AREA_METRICS.items()}
    some |= {name: group in groups for name, group in FREQUENCY_GROUPS.items()}
    annotated = {a["category_id"] for a in annotations}
    aps = {c["id"]: 0.0 for c in gt.dataset["categories"] if c["id"] in annotated}
    return LvisScores({name: 0.0 if some[name] else None for name in METRICS}, _categories(gt, aps))


def write_metrics(path: Path | str, results: Mapping[str, EvalResult], provenance: EvalProvenance | None = None) -> Path:
    """One metrics file for one or several methods on the same boxes: under ``methods`` each one's
    metrics (None: no ground truth), mask metrics, detection count, results file and AP per
    category id; under ``provenance`` what made them. The first method's metrics stay at the top
    level and its protocol and results file under ``eval``, where files written before had them."""
    first = next(iter(results.values()))
    settings = {**first.settings, "detections": first.num_detections, "results_file": _path_or_none(first.results_file)}
    methods = {name: _method_json(result) for name, result in results.items()}
    recorded = {"provenance": provenance.to_json()} if provenance is not None else {}
    return write_json(path, {**first.metrics, "eval": settings, "methods": methods, **recorded}, indent=2)


def _method_json(result: EvalResult) -> dict[str, Any]:
    return {
        "metrics": result.metrics,
        **({"segm_metrics": result.segm_metrics} if result.segm_metrics is not None else {}),
        "detections": result.num_detections,
        "results_file": _path_or_none(result.results_file),
        "per_category": {str(c.category_id): c.to_json() for c in result.per_category},
    }


def _path_or_none(path: Path | None) -> str | None:
    return str(path) if path else None

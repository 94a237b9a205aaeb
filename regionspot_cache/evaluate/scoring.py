"""Scoring protocols: region logits -> scored (box, class) pairs -> LVIS detections.

``softmax`` (the released RegionSpot code): class probability = softmax of the box's logits over
the vocabulary. ``sigmoid``: class probability = sigmoid(logit), matching the sigmoid focal
training loss. In both, score = box score x class probability (box score 1 for ground truth).

``standard`` protocol (the released code + LVIS defaults): per image the top ``top_k_per_image``
pairs of the flattened box x class matrix, of which LVIS keeps the ``max_dets_per_image`` best.
``fixed`` protocol (AP-fixed, Dave et al. 2021, "Evaluating large-vocabulary object detectors:
the devil is in the details"): no per-image cap; instead the top ``fixed_dets_per_class``
detections of each class over the whole dataset, so that AP no longer depends on how a
detector spreads a per-image budget over 1,203 classes.
``tap`` protocol (Tokenize Anything's ``scripts/eval_cls.py``, for side-by-side comparison):
every (box, class) pair whose class probability exceeds 0.001, scored sqrt(probability x box
score), per-class NMS at IoU 0.5, then per image the pairs scoring at least the
``max_dets_per_image``-th best (ties kept; LVIS then caps at that number). TAP's box score is
its predicted mask IoU clipped to [0, 1]; our boxes have none, so the box score takes its place
(1 for ground truth, the proposal's score for proposals).

Ties are broken by arrival order (image order, then box-major flat index): the same order in
which LVIS's own stable sorts would keep them, so capping here equals capping in ``lvis``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np
import torch
from torchvision.ops import batched_nms

from regionspot_cache.config import EvalConfig, Scoring
from regionspot_cache.runtime.files import NonFiniteValueError, atomic_path


def class_probabilities(logits: torch.Tensor, scoring: Scoring | str) -> torch.Tensor:
    """(N, C) probabilities in float64 (``Scoring.probabilities``)."""
    return Scoring.parse(scoring, "scoring").probabilities(logits)


def top_pairs(
    logits: torch.Tensor, box_scores: torch.Tensor, scoring: Scoring | str, top_k: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(box index, class index, score) of one image's best ``top_k`` pairs, best first; with
    ``top_k`` None every pair, in flat (box-major) order (the per-class cap needs no sort)."""
    probs = class_probabilities(logits, scoring) * box_scores.double()[:, None]
    num_classes = probs.shape[1]
    values = probs.flatten()
    flat = torch.arange(len(values), device=values.device)
    if top_k is not None:
        if top_k < len(values):
            # The k-th best value bounds the candidates (ties with it included); a stable sort of
            # these few keeps equal scores in flat-index order, so the top 300 of the top 900 are
            # the top 300 (topk's own order among ties is unspecified). 10x faster than sorting all.
            flat = (values >= values.topk(top_k).values[-1]).nonzero().squeeze(1)
        ordered, order = values[flat].sort(descending=True, stable=True)
        values, flat = ordered[:top_k], flat[order][:top_k]
    flat = flat.cpu().numpy()
    return flat // num_classes, (flat % num_classes).astype(np.int32), values.cpu().numpy()


@dataclass
class Pairs:
    """Scored (box, class) pairs; ``box_rows`` index a table of all scored boxes."""

    box_rows: np.ndarray  # (D,) int64
    classes: np.ndarray  # (D,) int32, index into the vocabulary
    scores: np.ndarray  # (D,) float64

    @staticmethod
    def concat(parts: list[Pairs]) -> Pairs:
        if not parts:
            return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float64))
        return Pairs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("box_rows", "classes", "scores")))

    def take(self, index: np.ndarray) -> Pairs:
        return Pairs(self.box_rows[index], self.classes[index], self.scores[index])


def rank_within_groups(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each element's 0-based rank in its group by score, best first, ties by position."""
    # Two stable sorts (score, then group) equal a lexsort with position as the last key, faster.
    by_score = np.argsort(-scores, kind="stable")
    order = by_score[np.argsort(groups[by_score], kind="stable")]
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order)) - run_start
    return ranks


class PerImageCollector:
    """Standard protocol: each image's pairs arrive best first, so capping is slicing."""

    def __init__(self, limit: int | None):
        self.limit, self.parts = limit, []

    def add(self, pairs: Pairs) -> None:
        self.parts.append(pairs if self.limit is None else pairs.take(slice(0, self.limit)))

    def result(self) -> Pairs:
        return Pairs.concat(self.parts)


class PerClassTopK:
    """Fixed protocol: the best ``k`` pairs of each class over all images, kept while streaming.

    Pairs below a class's current k-th best score are dropped on arrival (a later equal score
    would lose the tie anyway); the buffer is pruned to k per class when it outgrows ``budget``.
    """

    def __init__(self, num_classes: int, k: int, budget: int | None = None):
        self.k = k
        self.threshold = np.full(num_classes, -np.inf)
        # Room for as many again as are kept: few prunes (each sorts the buffer), 2x the memory.
        self.budget = budget or 2 * num_classes * k + (1 << 20)
        self.parts: list[Pairs] = []
        self.size = 0

    def add(self, pairs: Pairs) -> None:
        keep = pairs.scores > self.threshold[pairs.classes]
        if keep.any():
            self.parts.append(pairs.take(keep))
            self.size += int(keep.sum())
        if self.size > self.budget:
            self._prune()

    def _prune(self) -> None:
        pairs = Pairs.concat(self.parts)
        ranks = rank_within_groups(pairs.classes, pairs.scores)
        kept = pairs.take(ranks < self.k)  # boolean mask: arrival order is kept
        last = ranks[ranks < self.k] == self.k - 1  # the k-th best of each full class
        self.threshold[kept.classes[last]] = kept.scores[last]
        self.parts, self.size = [kept], len(kept.scores)

    def result(self) -> Pairs:
        self._prune()
        return self.parts[0]


class ScoringProtocol(ABC):
    """How a stream of per-image logits becomes the detection list LVIS counts.

    A protocol names the pairs ``top_pairs`` keeps per image (``per_image_limit``), what keeps
    pairs across images (``collector``), LVIS's per-image cap (``lvis_max_dets``) and a
    description of itself for results files, tables and reports (``settings``).
    """

    name: ClassVar[str]

    def __init__(self, config: EvalConfig):
        self.config = config

    @property
    def scoring(self) -> Scoring:
        return self.config.scoring

    @property
    @abstractmethod
    def per_image_limit(self) -> int | None:
        """Pairs ``top_pairs`` keeps per image, best first; None: every pair, in flat order."""

    @property
    @abstractmethod
    def lvis_max_dets(self) -> int:
        """``max_dets`` for ``lvis.LVISResults``: its per-image cap, -1 for none."""

    @abstractmethod
    def collector(self, num_classes: int) -> PerImageCollector | PerClassTopK:
        """A fresh collector of the pairs of all images (``add`` per image, then ``result``)."""

    @abstractmethod
    def rule(self) -> str:
        """One phrase saying what is kept, for ``settings()['description']``."""

    def image_pairs(self, logits: torch.Tensor, box_scores: torch.Tensor, boxes: np.ndarray) -> tuple[np.ndarray, ...]:
        """(box index, class index, score) of the pairs one image contributes."""
        return top_pairs(logits, box_scores, self.scoring, self.per_image_limit)

    def cap_finished(self, detections: Detections) -> Detections:
        """What ``collector`` keeps across images, applied to a finished list that did not come
        through it (a detector's own detections, ``eval --method detector``): nothing to drop here;
        LVIS applies the per-image cap (``lvis_max_dets``)."""
        return detections

    def settings(self) -> dict[str, Any]:
        """What produced a set of metrics, for results files, printed tables and reports."""
        return {
            "scoring": self.scoring,
            "protocol": self.name,
            "top_k_per_image": self.config.top_k_per_image,
            "max_dets_per_image": self.lvis_max_dets,
            "dets_per_class": None,
            "description": f"{self.scoring} scoring; {self.rule()}",
        }


class StandardProtocol(ScoringProtocol):
    """The released code + LVIS defaults: each image's top ``top_k_per_image`` pairs, of which
    LVIS keeps the ``max_dets_per_image`` best."""

    name = "standard"

    @property
    def per_image_limit(self) -> int:
        """Top-k, further cut to LVIS's per-image cap (the same top pairs: LVIS keeps the best)."""
        if self.config.max_dets_per_image < 0:
            return self.config.top_k_per_image
        return min(self.config.top_k_per_image, self.config.max_dets_per_image)

    @property
    def lvis_max_dets(self) -> int:
        return self.config.max_dets_per_image

    def collector(self, num_classes: int) -> PerImageCollector:
        return PerImageCollector(self.per_image_limit)

    def rule(self) -> str:
        cap = self.config.max_dets_per_image
        cap_text = "no LVIS per-image cap" if cap < 0 else f"LVIS max {cap} per image"
        return f"standard: top {self.config.top_k_per_image} (box, class) pairs per image, {cap_text}"


class FixedProtocol(ScoringProtocol):
    """AP-fixed (Dave et al. 2021): no per-image cap; the top ``fixed_dets_per_class``
    detections of each class over the whole dataset."""

    name = "fixed"

    @property
    def per_image_limit(self) -> None:
        return None

    @property
    def lvis_max_dets(self) -> int:
        return -1

    def collector(self, num_classes: int) -> PerClassTopK:
        return PerClassTopK(num_classes, self.config.fixed_dets_per_class)

    def rule(self) -> str:
        return f"fixed AP (Dave et al. 2021): no per-image cap, top {self.config.fixed_dets_per_class} detections per class"

    def cap_finished(self, detections: Detections) -> Detections:
        """The best ``fixed_dets_per_class`` of each class over the dataset, as ``PerClassTopK`` keeps them."""
        return cap_per_class(detections, self.config.fixed_dets_per_class)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "top_k_per_image": None, "dets_per_class": self.config.fixed_dets_per_class}


class TapProtocol(ScoringProtocol):
    """Tokenize Anything's region classification protocol (``scripts/eval_cls.py``); see the module doc."""

    name = "tap"
    min_probability = 0.001
    nms_iou = 0.5

    @property
    def per_image_limit(self) -> None:
        return None

    @property
    def lvis_max_dets(self) -> int:
        return self.config.max_dets_per_image

    def collector(self, num_classes: int) -> PerImageCollector:
        return PerImageCollector(None)

    def image_pairs(self, logits: torch.Tensor, box_scores: torch.Tensor, boxes: np.ndarray) -> tuple[np.ndarray, ...]:
        probs = class_probabilities(logits, self.scoring)
        box_index, classes = (probs > self.min_probability).nonzero(as_tuple=True)
        scores = (probs[box_index, classes] * box_scores.double().clamp(0, 1)[box_index]).sqrt()
        xyxy = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=logits.device)[box_index]
        keep = batched_nms(xyxy.float(), scores.float(), classes, self.nms_iou)  # best first
        box_index, classes, scores = box_index[keep], classes[keep], scores[keep]
        cap = self.config.max_dets_per_image
        if 0 < cap < len(scores):  # TAP keeps every pair at least as good as the cap-th best
            kept = scores >= scores.sort(descending=True).values[cap - 1]
            box_index, classes, scores = box_index[kept], classes[kept], scores[kept]
        return box_index.cpu().numpy(), classes.cpu().numpy().astype(np.int32), scores.cpu().numpy()

    def rule(self) -> str:
        return (
            f"tap (Tokenize Anything): pairs with probability > {self.min_probability}, score sqrt(p x box score), "
            f"per-class NMS {self.nms_iou}, best {self.config.max_dets_per_image} per image"
        )


# By ``EvalConfig.protocol``; a new protocol is one more class here and in config.EVAL_PROTOCOLS.
PROTOCOLS: dict[str, type[ScoringProtocol]] = {p.name: p for p in (StandardProtocol, FixedProtocol, TapProtocol)}


def protocol_for(config: EvalConfig) -> ScoringProtocol:
    """The protocol object that ``config.protocol`` names (``config`` validated first)."""
    config.validate()
    return PROTOCOLS[config.protocol](config)


@dataclass
class Detections:
    """LVIS detections as columns (one row per detection), in arrival order."""

    image_ids: np.ndarray  # (D,) int64
    category_ids: np.ndarray  # (D,) int64
    boxes: np.ndarray  # (D, 4) float32 x, y, w, h
    scores: np.ndarray  # (D,) float64

    @staticmethod
    def from_pairs(pairs: Pairs, box_image_ids: np.ndarray, box_xyxy: np.ndarray, category_ids: np.ndarray) -> Detections:
        xyxy = box_xyxy[pairs.box_rows].astype(np.float32)
        # x, y, w, h in float32, as the released code converts its float32 box tensors.
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        return Detections(box_image_ids[pairs.box_rows], category_ids[pairs.classes], xywh, pairs.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray) -> Detections:
        return Detections(self.image_ids[index], self.category_ids[index], self.boxes[index], self.scores[index])

    def records(self) -> list[dict]:
        """The LVIS results list (fresh dicts: ``lvis.LVISResults`` modifies them)."""
        return [{"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": s} for i, c, x, y, w, h, s in self._rows()]

    def _rows(self) -> zip:
        return zip(self.image_ids.tolist(), self.category_ids.tolist(), *self.boxes.T.tolist(), self.scores.tolist())


# One detection as JSON; %r writes the shortest repr that reads back to the same float, like json.
_RECORD = '{"image_id":%d,"category_id":%d,"bbox":[%r,%r,%r,%r],"score":%r}'


def write_results_json(detections: Detections, path: Path | str, chunk: int = 1 << 18) -> Path:
    """Write the LVIS results list; %-formatting rows is ~2x faster than dicts + json.dumps
    and needs no list of dicts in memory. Same values as ``Detections.records``."""
    path = Path(path)
    refuse_non_finite(detections, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[")
        for start in range(0, len(detections), chunk):
            part = detections.take(slice(start, start + chunk))
            out.write(("," if start else "") + ",".join([_RECORD % row for row in part._rows()]))
        out.write("]")
    return path


def refuse_non_finite(detections: Detections, path: Path) -> None:
    """%r would write ``nan``/``inf``, which no JSON parser reads: refuse such detections, naming one."""
    bad = ~(np.isfinite(detections.scores) & np.isfinite(detections.boxes).all(axis=1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise NonFiniteValueError(
            f"{path}: not written: {int(bad.sum())} detections with a NaN or infinite score or box, e.g. "
            f"image {int(detections.image_ids[first])} score {float(detections.scores[first])} "
            f"box {detections.boxes[first].tolist()}"
        )


def cap_per_image(detections: Detections, max_dets: int) -> Detections:
    """``lvis.LVISResults``' per-image cap (best ``max_dets`` scores, earlier first on ties),
    keeping arrival order; -1 keeps everything."""
    if max_dets < 0 or len(detections) == 0:
        return detections
    return detections.take(rank_within_groups(detections.image_ids, detections.scores) < max_dets)


def cap_per_class(detections: Detections, k: int) -> Detections:
    """The fixed protocol's cap on a finished list: best ``k`` per category over the dataset."""
    if len(detections) == 0:
        return detections
    return detections.take(rank_within_groups(detections.category_ids, detections.scores) < k)


def detections_from_logits(
    images: Iterable[tuple[int, np.ndarray, np.ndarray, torch.Tensor]], category_ids: np.ndarray, config: EvalConfig
) -> Detections:
    """Score a stream of ``(image_id, boxes x1y1x2y2 (N, 4), box scores (N,), logits (N, C))``
    under ``config``'s scoring and protocol; images without boxes may be left out."""
    protocol = protocol_for(config)
    keep = protocol.collector(len(category_ids))
    box_images: list[np.ndarray] = []
    box_xyxy: list[np.ndarray] = []
    rows = 0
    for image_id, boxes, box_scores, logits in images:
        box_scores = torch.tensor(box_scores, device=logits.device)
        box_index, classes, scores = protocol.image_pairs(logits, box_scores, boxes)
        keep.add(Pairs(box_index + rows, classes, scores))
        box_images.append(np.full(len(boxes), image_id, np.int64))
        box_xyxy.append(np.asarray(boxes, np.float32).reshape(-1, 4))
        rows += len(boxes)
    if not box_images:
        box_images, box_xyxy = [np.zeros(0, np.int64)], [np.zeros((0, 4), np.float32)]
    return Detections.from_pairs(keep.result(), np.concatenate(box_images), np.concatenate(box_xyxy), np.asarray(category_ids))

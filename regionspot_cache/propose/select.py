"""From a detector's chunk-by-chunk candidates to one image's proposals.

How scores across chunks merge: each chunk yields its candidate boxes, each with its best class
*in that chunk* and that class's score. Chunks are pooled, then class-agnostic NMS at ``nms_iou``
keeps the best-scoring box of each overlapping group, and the top ``top_k`` survive. So a box
ends up with its best class over the whole vocabulary where the detector's boxes do not depend
on the prompt (OWLv2: one box per patch; the chunks' scores are first reduced per box with a max,
which equals scoring all names at once), and with the best (box, class) among the chunks' own
boxes where they do (Grounding DINO, SAM 3: each chunk first keeps its ``top_k`` best candidates,
which bounds the pool at ``top_k`` x chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from regionspot_cache.errors import ConfigError
from regionspot_cache.propose.detectors import Detected, Detector

# Defaults, chosen with the paper's protocol in mind: RegionSpot's released evaluation scores the
# top boxes of GLIP's result file, and LVIS keeps at most 300 detections per image: K = 300.
# IoU 0.7 is the class-agnostic proposal NMS of RPNs and of SAM's automatic mask generator: looser
# than a detector's per-class 0.5, so that overlapping objects of different classes (a rider on
# a horse) keep their own boxes for RegionSpot to recognise.
DEFAULT_TOP_K = 300
DEFAULT_NMS_IOU = 0.7
DEFAULT_MIN_SCORE = 0.0
DEFAULT_CHUNK_SIZE = 64  # names per forward pass; Grounding DINO is also bounded by its 256 tokens


@dataclass(frozen=True)
class Selection:
    """How candidates become proposals: score floor, class-agnostic NMS IoU, boxes kept per image."""

    top_k: int = DEFAULT_TOP_K
    nms_iou: float = DEFAULT_NMS_IOU
    min_score: float = DEFAULT_MIN_SCORE
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def validate(self) -> Selection:
        if self.top_k < 1 or self.chunk_size < 1:
            raise ConfigError(f"top_k ({self.top_k}) and chunk_size ({self.chunk_size}) must be at least 1")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"nms_iou {self.nms_iou} must be in (0, 1]")
        if not 0.0 <= self.min_score < 1.0:
            raise ConfigError(f"min_score {self.min_score} must be in [0, 1)")
        return self


def detect_image(detector: Detector, image: Image.Image, names: Sequence[str], selection: Selection) -> Detected:
    """One image's proposals over the whole vocabulary: classes index ``names``."""
    prepared = detector.prepare(image)
    parts = []
    for chunk in detector.chunks(names, selection.chunk_size):
        found = detector.detect(prepared, [names[i] for i in chunk])
        parts.append(Detected(found.xyxy, found.classes + chunk.start, found.scores))
    return merge_chunks(parts, detector.boxes_shared, selection)


def merge_chunks(parts: Sequence[Detected], boxes_shared: bool, selection: Selection) -> Detected:
    """Pool the chunks' candidates (see the module docstring), then NMS and top K, best first."""
    if not parts:
        return Detected.empty()
    if boxes_shared:
        pooled = best_over_chunks(parts)
    else:
        pooled = Detected(*(np.concatenate(columns) for columns in zip(*(_top(part, selection.top_k) for part in parts))))
    # Boxes clipped to nothing (predicted in OWLv2's padding, say) are no proposals.
    has_area = (pooled.xyxy[:, 2] > pooled.xyxy[:, 0]) & (pooled.xyxy[:, 3] > pooled.xyxy[:, 1])
    pooled = pooled.take((pooled.scores >= selection.min_score) & has_area)
    return class_agnostic_nms(pooled, selection.nms_iou, selection.top_k)


def best_over_chunks(parts: Sequence[Detected]) -> Detected:
    """Chunks with the same boxes: each box's best class over all chunks (the first on ties, as argmax)."""
    scores = np.stack([part.scores for part in parts])  # (chunks, boxes)
    best = scores.argmax(axis=0)
    boxes = np.arange(scores.shape[1])
    classes = np.stack([part.classes for part in parts])[best, boxes]
    return Detected(parts[0].xyxy, classes, scores[best, boxes])


def _top(part: Detected, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-part.scores, kind="stable")[:k]
    chosen = part.take(order)
    return chosen.xyxy.reshape(-1, 4), chosen.classes, chosen.scores


def class_agnostic_nms(found: Detected, iou: float, top_k: int) -> Detected:
    """The ``top_k`` best boxes that survive NMS regardless of class. Candidates are first put in
    a stable score order, so that equal scores keep their arrival order on every run."""
    import torch
    from torchvision.ops import nms

    if not len(found):
        return found
    found = found.take(np.argsort(-found.scores, kind="stable"))
    keep = nms(torch.from_numpy(found.xyxy).double(), torch.from_numpy(found.scores).double(), iou).numpy()
    return found.take(np.sort(keep)[:top_k])

"""The detector's own result as a baseline: a proposal file's classes and scores, as they are.

``rs-cache propose`` keeps each box's class from the detector (its best class over the dataset's
vocabulary) as ``category_id``; scored with the same LVIS evaluation as RegionSpot on the same
boxes, this shows what RegionSpot's recognition adds. One class per box: the detector is not
given LVIS's allowance of several (box, class) pairs per box. A class-agnostic proposal set
(``propose --prompt agnostic``: category id -1) has no classes to score and is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from regionspot_cache.cache.reader import Vocabulary
from regionspot_cache.data.datasets import DatasetError
from regionspot_cache.data.proposals import NO_CLASS, load_proposals, read_provenance
from regionspot_cache.evaluate.scoring import Detections

AGNOSTIC_HINT = "method detector scores the detector's own classes: propose with --prompt vocabulary"


def check_has_classes(proposal_file: Path | str) -> None:
    """Refuse a proposal file whose provenance says it was prompted class-agnostic (read before
    any scoring work; a file without provenance is checked on its classes by ``detector_detections``)."""
    recorded = read_provenance(Path(proposal_file))
    if recorded is not None and not recorded.prompt.keeps_classes:
        raise DatasetError(
            f"{proposal_file}: class-agnostic proposals (rs-cache propose --prompt {recorded.prompt}, prompt "
            f"{recorded.prompt_text!r}): no classes; {AGNOSTIC_HINT}"
        )


def detector_detections(proposal_file: Path | str, vocabulary: Vocabulary) -> Detections:
    """The file's boxes with their own classes and scores, in image id then file order; a class
    outside ``vocabulary`` (or a class-agnostic file) is refused, naming the file."""
    check_has_classes(proposal_file)
    boxes = load_proposals(proposal_file, with_classes=True)
    image_ids = sorted(boxes)
    parts = [boxes[i] for i in image_ids]
    if not parts:
        return Detections(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0))
    classes = np.concatenate([p.category_ids for p in parts])
    if (classes == NO_CLASS).all():
        raise DatasetError(f"{proposal_file}: every box has category_id {NO_CLASS} (class-agnostic proposals); {AGNOSTIC_HINT}")
    unknown = np.setdiff1d(classes, vocabulary.category_ids)
    if len(unknown):
        raise DatasetError(
            f"{proposal_file}: classes {unknown[:5].tolist()} are not in the vocabulary {vocabulary.name!r} "
            "(method detector needs the detector's class per box, as `rs-cache propose` writes it)"
        )
    xyxy = np.concatenate([p.xyxy for p in parts]).astype(np.float32)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    ids = np.concatenate([np.full(len(p), i, np.int64) for i, p in zip(image_ids, parts)])
    scores = np.concatenate([p.scores for p in parts]).astype(np.float64)
    return Detections(ids, classes.astype(np.int64), xywh, scores)

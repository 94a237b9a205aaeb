"""Detector proposals to extract and score instead of ground-truth boxes.

Two formats are read, told apart by their top level:
- the GLIP result file distributed with RegionSpot: a JSON object mapping an image id (string) to
  ``{"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}`` in original pixels;
- COCO results: a JSON list of ``{"image_id", "bbox": [x, y, w, h], "score", "category_id"}``.
Proposals are class-agnostic here: their category id is -1 and their score multiplies the class
probability at evaluation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from regionspot_cache.data.datasets import (
    BoxSet,
    DatasetError,
    DetectionDataset,
    Manifest,
    exact_int,
    read_json,
    xyxy_array,
)
from regionspot_cache.runtime.files import sha256_file

GROUND_TRUTH = "gt"


def load_proposals(path: Path | str) -> dict[int, BoxSet]:
    path = Path(path)
    data = read_json(path, "proposal file")
    if isinstance(data, dict):
        return _from_glip(path, data)
    if isinstance(data, list):
        return _from_coco_results(path, data)
    raise DatasetError(f"{path}: expected a GLIP object (image id -> boxes) or a COCO results list")


def _from_glip(path: Path, data: dict[str, Any]) -> dict[int, BoxSet]:
    result = {}
    for key, entry in data.items():
        try:
            xyxy = xyxy_array(entry["boxes"])
            scores = np.asarray(entry["scores"], dtype=np.float64).reshape(-1)
            image_id = exact_int(int(key), "image id")
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: entry for image {key!r}: {err!r}") from None
        if len(scores) != len(xyxy):
            raise DatasetError(f"{path}: entry for image {key!r}: {len(xyxy)} boxes but {len(scores)} scores")
        check_scores(path, f"entry for image {key!r}", scores)
        result[image_id] = BoxSet(xyxy, np.full(len(xyxy), -1, np.int64), scores.astype(np.float32))
    return result


def _from_coco_results(path: Path, data: list[Any]) -> dict[int, BoxSet]:
    grouped: dict[int, list[tuple[list[float], float]]] = {}
    for index, entry in enumerate(data):
        try:
            x, y, w, h = (float(v) for v in entry["bbox"])
            grouped.setdefault(exact_int(entry["image_id"], "image_id"), []).append(([x, y, x + w, y + h], float(entry["score"])))
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: result #{index}: {err!r}") from None
        check_scores(path, f"result #{index}", [float(entry["score"])])
    return {
        image_id: BoxSet(
            xyxy_array([b for b, _ in items]),
            np.full(len(items), -1, np.int64),
            np.asarray([s for _, s in items], np.float32),
        )
        for image_id, items in grouped.items()
    }


def check_scores(path: Path, where: str, scores: Any) -> None:
    """A proposal's score multiplies its class probabilities: NaN or infinity would make every
    score of its box invalid, so the file is refused (non-finite boxes are rejected per box later)."""
    scores = np.asarray(scores, np.float64)
    bad = ~(np.abs(scores) <= np.finfo(np.float32).max)  # also NaN, and what float32 turns into inf
    if bad.any():
        raise DatasetError(f"{path}: {where}: score {float(scores[bad][0])} is not a finite float32 number")


def with_box_source(dataset: DetectionDataset, manifest: Manifest | None, boxes: str) -> tuple[DetectionDataset, str]:
    """The dataset with the boxes to extract, and the box source recorded in the cache:
    ``gt``, or ``proposals:<name>:<sha256 of the file>`` for a manifest name or a file path."""
    if boxes == GROUND_TRUTH:
        return dataset, GROUND_TRUTH
    path = proposal_path(manifest, boxes)
    proposals = load_proposals(path)
    unknown = sorted(set(proposals) - {entry.id for entry in dataset.images})
    if unknown:
        raise DatasetError(f"{path}: proposals for images not in {dataset.name}: {unknown[:5]}")
    return replace(dataset, boxes=proposals), box_source_id(path)


def proposal_path(manifest: Manifest | None, boxes: str) -> Path:
    if manifest is not None and boxes in manifest.proposals:
        return manifest.proposals[boxes]
    path = Path(boxes)
    if not path.is_file():
        known = sorted(manifest.proposals) if manifest else []
        raise DatasetError(f"{boxes}: neither 'gt', a proposal set of the manifest {known}, nor a file")
    return path


def box_source_id(path: Path) -> str:
    return f"proposals:{path.name}:{sha256_file(path)}"

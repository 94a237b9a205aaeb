"""The ground truth that evaluation compares against, checked before anything is scored.

Three checks make a silent AP of 0.0 impossible: the file's categories must be the vocabulary the
detections are labelled in (same ids, same names); its images must be the cache's (same ids, same
file names: an annotation file of another dataset with the same categories is refused); and a COCO-format file (without LVIS's
``neg_category_ids``, ``not_exhaustive_category_ids`` and ``frequency``) gets those fields filled
in as COCO means them: every category not annotated in an image is a verified negative there
(COCO labels exhaustively), none is non-exhaustive, and every category counts as ``f``requent
(so APr and APc are n/a). The filling is logged. ``lvis.LVISEval`` then computes AP as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lvis import LVIS

from regionspot_cache.cache.reader import Vocabulary
from regionspot_cache.data.datasets import DatasetError, image_file_name, read_json

log = logging.getLogger(__name__)
FILLED_FREQUENCY = "f"


class InMemoryLVIS(LVIS):
    """``lvis.LVIS`` on an annotation dict already read and checked (it only reads from paths)."""

    def _load_json(self, path: Any) -> Any:
        return path


def load_ground_truth(path: Path | str, vocabulary: Vocabulary) -> dict[str, Any]:
    """The annotation file as LVIS data, with COCO-format fields filled in; refused with one
    line naming the file if it is not a detection file or its categories are not ``vocabulary``'s."""
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("images", "annotations", "categories")):
        raise DatasetError(f"{path}: expected a COCO or LVIS annotation object with lists images, annotations, categories")
    check_same_categories(path, data["categories"], vocabulary)
    try:
        filled = fill_lvis_fields(data)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise DatasetError(f"{path}: malformed image, annotation or category entry: {err!r}") from None
    if filled:
        log.warning(
            "%s: COCO-format annotations: filled in %s (every category not annotated in an image counts as "
            "a negative there, as COCO labels exhaustively; all categories count as frequent, so APr/APc are n/a)",
            path,
            ", ".join(filled),
        )
    return data


def check_same_categories(path: Path, categories: list[Any], vocabulary: Vocabulary) -> None:
    """Detections carry the vocabulary's category ids: scored against other categories they would
    give AP 0.0 (or a wrong AP) without a word, so any difference is refused."""
    try:
        in_file = {int(c["id"]): str(c["name"]) for c in categories}
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path}: categories: malformed entry: {err!r}") from None
    in_vocab = {int(i): name for i, name in zip(vocabulary.category_ids.tolist(), vocabulary.names)}
    problems = [f"id {i} only in the file" for i in sorted(set(in_file) - set(in_vocab))]
    problems += [f"id {i} only in the vocabulary" for i in sorted(set(in_vocab) - set(in_file))]
    problems += [
        f"id {i} is {in_file[i]!r} in the file but {in_vocab[i]!r} in the vocabulary"
        for i in sorted(set(in_file) & set(in_vocab))
        if in_file[i] != in_vocab[i]
    ]
    if problems:
        raise DatasetError(
            f"{path}: its categories are not those of the cache's vocabulary {vocabulary.name!r} "
            f"({len(problems)} differences, e.g. {'; '.join(problems[:3])}); evaluate with the annotation file "
            "the cache was extracted from, or a cache extracted from this one"
        )


def fill_lvis_fields(data: dict[str, Any]) -> list[str]:
    """Fill the LVIS fields a COCO-format file lacks (see the module's note); returns their names."""
    filled = []
    all_ids = {int(c["id"]) for c in data["categories"]}
    if any("neg_category_ids" not in image for image in data["images"]):
        positives: dict[int, set[int]] = {}
        for annotation in data["annotations"]:
            positives.setdefault(annotation["image_id"], set()).add(int(annotation["category_id"]))
        for image in data["images"]:
            image.setdefault("neg_category_ids", sorted(all_ids - positives.get(image["id"], set())))
        filled.append("neg_category_ids")
    if any("not_exhaustive_category_ids" not in image for image in data["images"]):
        for image in data["images"]:
            image.setdefault("not_exhaustive_category_ids", [])
        filled.append("not_exhaustive_category_ids")
    if any("frequency" not in category for category in data["categories"]):
        for category in data["categories"]:
            category.setdefault("frequency", FILLED_FREQUENCY)
        filled.append("frequency")
    if any("area" not in annotation for annotation in data["annotations"]):
        for annotation in data["annotations"]:
            annotation.setdefault("area", float(annotation["bbox"][2]) * float(annotation["bbox"][3]))
        filled.append("area")
    return filled


def check_same_images(path: Path, data: dict[str, Any], cached: dict[int, str], partial: bool) -> dict[str, Any]:
    """The ground truth of the images the cache holds (``cached``: image id -> file name). An image
    of another file name, or a cached image the file lacks, is refused: the annotation file is of
    another dataset. Images of the file the cache lacks are refused too (they would count as misses)
    unless the cache is ``partial`` by choice (--allow-partial): then they are left out of the AP."""
    try:
        in_file = {image["id"]: image_file_name(image) for image in data["images"]}
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{path}: images: malformed entry: {err!r}") from None
    renamed = [i for i in set(in_file) & set(cached) if in_file[i] != cached[i]]
    if renamed:
        i = min(renamed)
        raise DatasetError(
            f"{path}: not the annotation file of this cache: {len(renamed)} image ids name other files "
            f"(image {i} is {in_file[i]!r} in the file, {cached[i]!r} in the cache)"
        )
    only_cached = sorted(set(cached) - set(in_file))
    if only_cached:
        raise DatasetError(
            f"{path}: not the annotation file of this cache: it lacks {len(only_cached)} of the cache's "
            f"{len(cached)} images (e.g. image ids {only_cached[:3]})"
        )
    only_in_file = sorted(set(in_file) - set(cached))
    if not only_in_file:
        return data
    if not partial:
        raise DatasetError(
            f"{path}: {len(only_in_file)} of its {len(in_file)} images are not in the cache (e.g. image "
            f"ids {only_in_file[:3]}); they would count as misses"
        )
    kept = set(cached)
    return {
        **data,
        "images": [image for image in data["images"] if image["id"] in kept],
        "annotations": [a for a in data["annotations"] if a.get("image_id") in kept],
    }


@dataclass
class GroundTruthBoxes:
    """The annotated boxes, as columns: what drawn examples show beside each prediction."""

    image_ids: np.ndarray  # (G,) int64
    category_ids: np.ndarray  # (G,) int64
    boxes: np.ndarray  # (G, 4) float32 x, y, w, h

    @staticmethod
    def of(data: dict[str, Any]) -> GroundTruthBoxes:
        """From LVIS data (``load_ground_truth``), before ``lvis.LVISEval`` changes it."""
        annotations = data["annotations"]
        return GroundTruthBoxes(
            np.array([a["image_id"] for a in annotations], np.int64),
            np.array([a["category_id"] for a in annotations], np.int64),
            np.array([a["bbox"] for a in annotations], np.float32).reshape(-1, 4),
        )

    def best_match(self, image_id: int, box: np.ndarray, min_iou: float = 0.5) -> int | None:
        """The category of the image's annotated box overlapping ``box`` (x, y, w, h) most, if
        their IoU reaches ``min_iou`` (a ground-truth box is its own match); else None."""
        own = np.flatnonzero(self.image_ids == image_id)
        if not len(own):
            return None
        ious = box_iou_xywh(np.asarray(box, np.float64), self.boxes[own].astype(np.float64))
        best = int(np.argmax(ious))
        return int(self.category_ids[own[best]]) if ious[best] >= min_iou else None


def box_iou_xywh(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with each of (N, 4) boxes, all x, y, w, h."""
    left = np.maximum(box[0], boxes[:, 0])
    top = np.maximum(box[1], boxes[:, 1])
    right = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    bottom = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)

"""The ground truth that evaluation compares against, checked before anything is scored.

Two checks make a silent AP of 0.0 impossible: the file's categories must be the vocabulary the
detections are labelled in (same ids, same names), and a COCO-format file (without LVIS's
``neg_category_ids``, ``not_exhaustive_category_ids`` and ``frequency``) gets those fields filled
in as COCO means them: every category not annotated in an image is a verified negative there
(COCO labels exhaustively), none is non-exhaustive, and every category counts as ``f``requent
(so APr and APc are n/a). The filling is logged. ``lvis.LVISEval`` then computes AP as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lvis import LVIS

from regionspot_cache.cache.reader import Vocabulary
from regionspot_cache.data.datasets import DatasetError, read_json

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
        log.warning("%s: COCO-format annotations: filled in %s (every category not annotated in an image counts as "
                    "a negative there, as COCO labels exhaustively; all categories count as frequent, so APr/APc are n/a)",
                    path, ", ".join(filled))
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
    problems += [f"id {i} is {in_file[i]!r} in the file but {in_vocab[i]!r} in the vocabulary"
                 for i in sorted(set(in_file) & set(in_vocab)) if in_file[i] != in_vocab[i]]
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

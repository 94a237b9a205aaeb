"""Detection datasets in COCO / LVIS JSON format, and the manifests that name them.

A manifest (TOML, see ``manifests/``) says what a dataset is: its annotation file, its image root
and its vocabulary. Relative paths resolve against a data root (``--data-root``, default ``.``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from regionspot_cache.errors import DatasetError
from regionspot_cache.runtime.files import read_toml

T = TypeVar("T")


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    frequency: str | None = None  # LVIS r / c / f


@dataclass(frozen=True)
class ImageEntry:
    id: int
    file_name: str
    width: int
    height: int


def xyxy_array(boxes: Any) -> np.ndarray:
    """Boxes given by a user or a file as (N, 4) float32. Values beyond float32's range become
    inf without a NumPy warning: box validation (``data.boxes.split_boxes``) rejects them with a
    reason. Raises ValueError when the values do not form rows of four."""
    with np.errstate(over="ignore"):
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


@dataclass
class BoxSet:
    """Boxes of one image in original pixels (x1, y1, x2, y2), with category ids and scores."""

    xyxy: np.ndarray  # (N, 4) float32
    category_ids: np.ndarray  # (N,) int64, -1 where unknown (proposals)
    scores: np.ndarray  # (N,) float32, 1 for ground truth

    @staticmethod
    def empty() -> "BoxSet":
        return BoxSet(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.xyxy)

    def take(self, index: np.ndarray) -> "BoxSet":
        """The boxes a boolean mask or an index array selects."""
        return BoxSet(self.xyxy[index], self.category_ids[index], self.scores[index])

    @staticmethod
    def concat(parts: Sequence["BoxSet"]) -> "BoxSet":
        """The boxes of ``parts``, one set after another."""
        return BoxSet(
            np.concatenate([p.xyxy.reshape(-1, 4) for p in parts]).astype(np.float32),
            np.concatenate([p.category_ids for p in parts]).astype(np.int64),
            np.concatenate([p.scores for p in parts]).astype(np.float32),
        )


@dataclass
class DetectionDataset:
    name: str
    annotation_file: Path
    image_root: Path
    images: list[ImageEntry]
    categories: list[Category]
    boxes: dict[int, BoxSet] = field(default_factory=dict)

    def boxes_of(self, image_id: int) -> BoxSet:
        return self.boxes.get(image_id, BoxSet.empty())

    def image_path(self, entry: ImageEntry) -> Path:
        return image_path_under(self.image_root, entry.file_name, entry.id)


def image_path_under(image_root: Path, file_name: str, image_id: int) -> Path:
    """Image ``image_id``'s file; a ``file_name`` that leads outside the image root is refused."""
    root = Path(image_root).resolve()
    path = (root / file_name).resolve()
    if not path.is_relative_to(root):
        raise DatasetError(f"{file_name}: file_name of image {image_id} escapes the image root {root}")
    return path


@dataclass(frozen=True)
class Manifest:
    name: str
    annotations: Path
    image_root: Path
    source: Path | None = None
    proposals: dict[str, Path] = field(default_factory=dict)  # e.g. {"glip": GLIP result file}

    def load(self) -> DetectionDataset:
        return load_coco_format(self.annotations, self.image_root, name=self.name)


def load_manifest(path: Path | str, data_root: Path | str = ".") -> Manifest:
    path = Path(path)
    data = read_toml(path, "manifest", DatasetError)
    missing = [key for key in ("name", "annotations", "image_root") if key not in data]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {missing}")
    root = Path(data_root)
    proposals = data.get("proposals", {})
    if not isinstance(proposals, dict):
        raise DatasetError(f"{path}: 'proposals' must be a table of name = file")
    return Manifest(
        name=str(data["name"]),
        annotations=root / data["annotations"],
        image_root=root / data["image_root"],
        source=path,
        proposals={str(k): root / v for k, v in proposals.items()},
    )


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; errors name the file and the line and column of the problem."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise DatasetError(f"{path}: not usable JSON: nested too deeply") from None


def image_file_name(image: dict) -> str:
    """COCO has ``file_name``; LVIS v1 has only ``coco_url`` ending in ``split/file``."""
    if "file_name" in image:
        return str(image["file_name"])
    if "coco_url" in image:
        return "/".join(str(image["coco_url"]).split("/")[-2:])
    raise KeyError("file_name")


def load_coco_format(path: Path | str, image_root: Path | str, name: str | None = None) -> DetectionDataset:
    """Read a COCO / LVIS detection JSON file; ground-truth boxes become (x1, y1, x2, y2).
    A malformed entry fails at once, naming the file and the entry (e.g. ``annotations[17]``)."""
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise DatasetError(f"{path}: expected a JSON object with images, annotations and categories")
    images = _parse_entries(path, data, "images", _image_entry)
    categories = sorted(_parse_entries(path, data, "categories", _category), key=lambda c: c.id)
    for section, ids in (("images", [i.id for i in images]), ("categories", [c.id for c in categories])):
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise DatasetError(f"{path}: {section}: duplicate id {duplicate}")
    annotations = _parse_entries(path, data, "annotations", _annotation)
    known, classes = {image.id for image in images}, {category.id for category in categories}
    for index, (image_id, _, category_id) in enumerate(annotations):
        if image_id not in known:
            raise DatasetError(f"{path}: annotations[{index}]: image_id {image_id} is not in images")
        if category_id not in classes:
            raise DatasetError(f"{path}: annotations[{index}]: category_id {category_id} is not in categories")
    return DetectionDataset(name or path.stem, path, Path(image_root), images, categories, _group_boxes(annotations))


def _parse_entries(path: Path, data: dict, section: str, parse: Callable[[Any], T]) -> list[T]:
    entries = data.get(section, [])
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: {section}: expected a list, got {type(entries).__name__}")
    parsed = []
    for index, entry in enumerate(entries):
        try:
            parsed.append(parse(entry))
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise DatasetError(f"{path}: {section}[{index}]: malformed entry: {err!r}") from None
    return parsed


INT64_MAX = 2**63 - 1  # ids are stored as int64 in the cache


def exact_int(value: Any, field: str, low: int = 0, high: int = INT64_MAX) -> int:
    """``value`` as an int only when that loses nothing: 1.7 or "3" or True are refused, not turned
    into 1, 3 or 1 (a category id of 1.7 silently becoming 1 scores the box as another class), and
    an id the int64 columns cannot hold is refused before the writer overflows."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} {value!r} is not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{field} {value!r} is not an integer")
    if not low <= value <= high:
        raise ValueError(f"{field} {value!r} is outside {low}..{high}")
    return int(value)


def _image_entry(image: dict) -> ImageEntry:
    return ImageEntry(
        exact_int(image["id"], "id"),
        image_file_name(image),
        exact_int(image["width"], "width", 1),
        exact_int(image["height"], "height", 1),
    )


def _category(category: dict) -> Category:
    return Category(exact_int(category["id"], "id"), str(category["name"]), category.get("frequency"))


def _annotation(annotation: dict) -> tuple[int, list[float], int]:
    x, y, w, h = (float(v) for v in annotation["bbox"])
    image_id, category_id = exact_int(annotation["image_id"], "image_id"), exact_int(annotation["category_id"], "category_id")
    return image_id, [x, y, x + w, y + h], category_id


def _group_boxes(annotations: list[tuple[int, list[float], int]]) -> dict[int, BoxSet]:
    grouped: dict[int, list[tuple[list[float], int]]] = {}
    for image_id, box, category_id in annotations:
        grouped.setdefault(image_id, []).append((box, category_id))
    result = {}
    for image_id, items in grouped.items():
        xyxy = xyxy_array([box for box, _ in items])
        cats = np.asarray([cat for _, cat in items], dtype=np.int64)
        result[image_id] = BoxSet(xyxy, cats, np.ones(len(items), np.float32))
    return result

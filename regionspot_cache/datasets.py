"""Detection datasets in COCO / LVIS JSON format, and the manifests that name them.

A manifest (TOML, see ``manifests/``) says what a dataset is: its annotation file, its image root
and its vocabulary. Relative paths resolve against a data root (``--data-root``, default ``.``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import read_toml


class DatasetError(ValueError):
    """An annotation file or manifest that cannot be used; the message names the file."""


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
        """The image's file; a ``file_name`` that leads outside the image root is refused."""
        root = self.image_root.resolve()
        path = (root / entry.file_name).resolve()
        if not path.is_relative_to(root):
            raise DatasetError(f"{entry.file_name}: file_name of image {entry.id} escapes the image root {root}")
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


def _image_file_name(image: dict) -> str:
    """COCO has ``file_name``; LVIS v1 has only ``coco_url`` ending in ``split/file``."""
    if "file_name" in image:
        return str(image["file_name"])
    if "coco_url" in image:
        return "/".join(str(image["coco_url"]).split("/")[-2:])
    raise KeyError("file_name")


def load_coco_format(path: Path | str, image_root: Path | str, name: str | None = None) -> DetectionDataset:
    """Read a COCO / LVIS detection JSON file; ground-truth boxes become (x1, y1, x2, y2)."""
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories")
    where = "images"
    try:
        images = [
            ImageEntry(int(im["id"]), _image_file_name(im), int(im["width"]), int(im["height"]))
            for im in data["images"]
        ]
        where = "categories"
        categories = sorted(
            (Category(int(c["id"]), str(c["name"]), c.get("frequency")) for c in data["categories"]),
            key=lambda c: c.id,
        )
        where = "annotations"
        boxes = _group_boxes(data.get("annotations", []))
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path}: malformed {where!r} entry: {err!r}") from None
    return DetectionDataset(name or path.stem, path, Path(image_root), images, categories, boxes)


def _group_boxes(annotations: list[dict]) -> dict[int, BoxSet]:
    grouped: dict[int, list[tuple[list[float], int]]] = {}
    for ann in annotations:
        x, y, w, h = (float(v) for v in ann["bbox"])
        grouped.setdefault(int(ann["image_id"]), []).append(([x, y, x + w, y + h], int(ann["category_id"])))
    result = {}
    for image_id, items in grouped.items():
        xyxy = np.asarray([box for box, _ in items], dtype=np.float32).reshape(-1, 4)
        cats = np.asarray([cat for _, cat in items], dtype=np.int64)
        result[image_id] = BoxSet(xyxy, cats, np.ones(len(items), np.float32))
    return result

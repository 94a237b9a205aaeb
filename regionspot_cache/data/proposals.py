"""Detector proposals to extract and score instead of ground-truth boxes.

Two formats are read, told apart by their top level:
- the GLIP result file distributed with RegionSpot: a JSON object mapping an image id (string) to
  ``{"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}`` in original pixels;
- COCO results: a JSON list of ``{"image_id", "bbox": [x, y, w, h], "score", "category_id"}``.
Proposals are class-agnostic here: their category id is -1 and their score multiplies the class
probability at evaluation. ``load_proposals(path, with_classes=True)`` keeps the detector's own
class per box instead (``category_id``, or GLIP's ``labels``), for ``eval --method detector``.

A proposal file written by ``rs-cache propose`` has its provenance beside it
(``<file>.provenance.json``, ``ProposalProvenance``): the detector, its weights, the selection
settings, the vocabulary it was prompted with (or the generic prompt of a class-agnostic run)
and the file's own hash. ``check_provenance`` refuses a file that no longer matches its record
or, unless class-agnostic, that was made for another vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from regionspot_cache.choices import ProposalPrompt
from regionspot_cache.data.datasets import (
    BoxSet,
    Category,
    DatasetError,
    DetectionDataset,
    Manifest,
    exact_int,
    read_json,
    xyxy_array,
)
from regionspot_cache.errors import ConfigError
from regionspot_cache.runtime.files import sha256_file

GROUND_TRUTH = "gt"
NO_CLASS = -1  # the category id of a box without a class (class-agnostic proposals)


def load_proposals(path: Path | str, with_classes: bool = False) -> dict[int, BoxSet]:
    """Boxes by image id. Class-agnostic (category id -1) unless ``with_classes``: then each box
    keeps the class its detector gave it (COCO results' ``category_id``, GLIP's ``labels``)."""
    path = Path(path)
    data = read_json(path, "proposal file")
    if isinstance(data, dict):
        return _from_glip(path, data, with_classes)
    if isinstance(data, list):
        return _from_coco_results(path, data, with_classes)
    raise DatasetError(f"{path}: expected a GLIP object (image id -> boxes) or a COCO results list")


def _from_glip(path: Path, data: dict[str, Any], with_classes: bool) -> dict[int, BoxSet]:
    result = {}
    for key, entry in data.items():
        try:
            xyxy = xyxy_array(entry["boxes"])
            scores = np.asarray(entry["scores"], dtype=np.float64).reshape(-1)
            labels = np.asarray(entry["labels"] if with_classes else [-1] * len(xyxy), np.int64).reshape(-1)
            image_id = exact_int(int(key), "image id")
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: entry for image {key!r}: {err!r}") from None
        if not len(scores) == len(labels) == len(xyxy):
            raise DatasetError(
                f"{path}: entry for image {key!r}: {len(xyxy)} boxes but {len(scores)} scores and {len(labels)} labels"
            )
        check_scores(path, f"entry for image {key!r}", scores)
        result[image_id] = BoxSet(xyxy, labels, scores.astype(np.float32))
    return result


def _from_coco_results(path: Path, data: list[Any], with_classes: bool) -> dict[int, BoxSet]:
    grouped: dict[int, list[tuple[list[float], float, int]]] = {}
    for index, entry in enumerate(data):
        try:
            x, y, w, h = (float(v) for v in entry["bbox"])
            # -1 (NO_CLASS): a box without a class (``propose --prompt agnostic``).
            label = exact_int(entry["category_id"], "category_id", low=NO_CLASS) if with_classes else NO_CLASS
            grouped.setdefault(exact_int(entry["image_id"], "image_id"), []).append(
                ([x, y, x + w, y + h], float(entry["score"]), label)
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: result #{index}: {err!r}") from None
        check_scores(path, f"result #{index}", [float(entry["score"])])
    return {
        image_id: BoxSet(
            xyxy_array([b for b, _, _ in items]),
            np.asarray([c for _, _, c in items], np.int64),
            np.asarray([s for _, s, _ in items], np.float32),
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
    check_provenance(path, dataset.categories)
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


@dataclass(frozen=True)
class ProposalProvenance:
    """How a proposal file was made (``<file>.provenance.json``), checked like a cache's identity."""

    detector: str  # the model id or directory given to ``rs-cache propose``
    detector_family: str  # grounding-dino, mm-grounding-dino, owlv2, owlvit, sam3
    weights_sha256: str
    dataset: str
    vocabulary_sha256: str  # ``vocabulary_digest`` of the categories the detector was prompted with
    num_classes: int
    images_sha256: str  # ``images_digest`` of the dataset's images (id, file, size)
    chunk_size: int
    min_score: float
    top_k: int
    nms_iou: float
    shard_size: int
    package_version: str
    transformers_version: str
    prompt: ProposalPrompt = ProposalPrompt.VOCABULARY  # older records have none: they were all prompted so
    prompt_text: str = ""  # the generic prompt of ``agnostic``; empty for ``vocabulary``
    proposals_sha256: str = ""  # of the proposal file itself; empty while shards are pending
    images: int = 0
    failed_images: dict[str, str] = field(default_factory=dict)  # image id -> reason

    def identity(self) -> dict[str, Any]:
        """What must match for shards of an interrupted run to be reused."""
        data = asdict(self)
        for key in ("proposals_sha256", "images", "failed_images"):
            data.pop(key)
        return data

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, path: Path, data: Any) -> ProposalProvenance:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            raise DatasetError(f"{path}: not a proposal provenance record (fields {sorted(names)})")
        try:
            record = cls(**data)
            return replace(record, prompt=ProposalPrompt.parse(record.prompt, "prompt"))
        except (TypeError, ConfigError) as err:
            raise DatasetError(f"{path}: not a proposal provenance record: {err}") from None


def vocabulary_digest(categories: Sequence[Category]) -> str:
    """sha256 of the (id, name) pairs in id order: the vocabulary a detector was prompted with."""
    pairs = sorted((int(c.id), str(c.name)) for c in categories)
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()


def images_digest(dataset: DetectionDataset) -> str:
    """sha256 of the dataset's images (id, file name, size) in id order."""
    rows = sorted((e.id, e.file_name, e.width, e.height) for e in dataset.images)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def provenance_path(proposal_file: Path) -> Path:
    return proposal_file.with_name(f"{proposal_file.name}.provenance.json")


def read_provenance(proposal_file: Path) -> ProposalProvenance | None:
    """The recorded provenance of ``proposal_file``; None for a file without one (e.g. GLIP's)."""
    path = provenance_path(Path(proposal_file))
    return ProposalProvenance.from_json(path, read_json(path, "provenance")) if path.is_file() else None


def check_provenance(proposal_file: Path | str, categories: Sequence[Category]) -> ProposalProvenance | None:
    """Refuse a proposal file that differs from the one its provenance describes (edited or
    replaced since ``rs-cache propose``), or that was made for another vocabulary."""
    proposal_file = Path(proposal_file)
    recorded = read_provenance(proposal_file)
    if recorded is None:
        return None
    where = provenance_path(proposal_file)
    found = sha256_file(proposal_file)
    if recorded.proposals_sha256 != found:
        raise DatasetError(
            f"{proposal_file}: its provenance {where.name} records sha256 "
            f"{recorded.proposals_sha256 or '(none)'}, the file has {found}: edited or replaced since "
            "`rs-cache propose`"
        )
    vocabulary = vocabulary_digest(categories)
    # Class-agnostic boxes were prompted with one generic word: any vocabulary can score them.
    if recorded.prompt.keeps_classes and recorded.vocabulary_sha256 != vocabulary:
        raise DatasetError(
            f"{proposal_file}: made for vocabulary {recorded.vocabulary_sha256[:12]} ({recorded.dataset}, "
            f"{recorded.num_classes} classes), the dataset's is {vocabulary[:12]} ({len(categories)} classes)"
        )
    return recorded

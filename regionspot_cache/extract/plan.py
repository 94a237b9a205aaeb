"""Shard planning: how a dataset splits into shards, which of them are still to extract, and
whether committed ones were extracted from the inputs the dataset has now."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np

from regionspot_cache.cache import CacheFormatError, CacheWriter
from regionspot_cache.cache.contents import ImageDigests, check_image_contents, describe
from regionspot_cache.data.datasets import DetectionDataset, ImageEntry

logger = logging.getLogger(__name__)

Shard = tuple[int, list[ImageEntry]]  # (shard id, its images in id order)


def shard_entries(images: Sequence[ImageEntry], shard_size: int) -> Iterator[Shard]:
    """Images in id order, ``shard_size`` per shard: the split depends only on the dataset."""
    ordered = sorted(images, key=lambda entry: entry.id)
    for shard_id, start in enumerate(range(0, len(ordered), shard_size)):
        yield shard_id, ordered[start : start + shard_size]


def planned_shards(images: Sequence[ImageEntry], shard_size: int) -> int:
    return -(-len(images) // shard_size)


def shard_input_digest(dataset: DetectionDataset, entries: Sequence[ImageEntry]) -> str:
    """SHA-256 of what a shard is extracted from: its images (id, file, size) and their boxes as
    given (coordinates, categories, scores), recorded at commit to notice edited inputs later."""
    digest = hashlib.sha256()
    for entry in entries:
        boxes = dataset.boxes_of(entry.id)
        digest.update(json.dumps([entry.id, entry.file_name, entry.width, entry.height, len(boxes)]).encode())
        for values, dtype in ((boxes.xyxy, np.float32), (boxes.category_ids, np.int64), (boxes.scores, np.float32)):
            digest.update(np.ascontiguousarray(values, dtype=dtype).tobytes())
    return digest.hexdigest()


def shard_dataset(dataset: DetectionDataset, entries: list[ImageEntry]) -> DetectionDataset:
    """The part of ``dataset`` one shard needs (what is sent to a remote worker)."""
    return replace(dataset, images=entries, boxes={e.id: dataset.boxes_of(e.id) for e in entries})


def check_inputs_unchanged(writer: CacheWriter, dataset: DetectionDataset, committed: Sequence[Shard]) -> None:
    """Refuse to skip committed shards whose images or boxes have changed since they were
    extracted (an edited annotation file under the same dataset name): they would be stale."""
    changed = [
        shard_id
        for shard_id, entries in committed
        if writer.recorded_input_digest(shard_id) not in (None, shard_input_digest(dataset, entries))
    ]
    if changed:
        names = ", ".join(f"{shard_id:06d}" for shard_id in changed[:8]) + (" ..." if len(changed) > 8 else "")
        raise CacheFormatError(
            f"{writer.location}: shards {names} were extracted from other images or boxes than {dataset.name!r} has now "
            "(an edited annotation or proposals file?), so their features would be stale. Extract into a new cache, "
            "or delete those shard directories under shards/ and re-run to extract only them again"
        )


def check_images_unchanged(writer: CacheWriter, dataset: DetectionDataset, committed: set[int]) -> None:
    """``extract.check_images``: refuse to skip committed shards one of whose image files holds
    other bytes than it was extracted from (an image replaced under the same name and size)."""
    check = check_image_contents(writer.location, ImageDigests(dataset), committed)
    stale = [problem for problem in check.problems if problem.stale]
    if check.unrecorded_shards:
        logger.warning(
            "%s: %d committed shard(s) predate the recording of image digests: their images cannot be checked",
            writer.root,
            len(check.unrecorded_shards),
        )
    if stale:
        shown = "; ".join(describe(problem) for problem in stale[:3]) + ("; ..." if len(stale) > 3 else "")
        raise CacheFormatError(
            f"{writer.location}: {len(stale)} image(s) replaced since their shards were extracted ({shown}): their "
            f"features would be stale. Re-extract those shards with `rs-cache repair {writer.location} --manifest ... "
            "--images`, or extract into a new cache"
        )


def pending_shards(shards: Sequence[Shard], committed: set[int], only: set[int] | None) -> list[Shard]:
    """The shards still to extract: not committed, and among ``only`` when given."""
    return [(i, entries) for i, entries in shards if i not in committed and (only is None or i in only)]

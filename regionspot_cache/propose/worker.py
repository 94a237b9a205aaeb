"""The one worker function every distributor calls: a shard of images -> its shard file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from regionspot_cache.data.datasets import DatasetError, ImageEntry
from regionspot_cache.data.images import ImageDecodeError, ImageSource
from regionspot_cache.data.proposals import ProposalProvenance
from regionspot_cache.propose.detectors import Detector
from regionspot_cache.propose.select import Selection, detect_image
from regionspot_cache.propose.writer import ProposalWriter, ShardRecord, records

logger = logging.getLogger(__name__)

Shard = tuple[int, list[ImageEntry]]


@dataclass
class ProposeWork:
    """What every shard of one run shares; sent whole to remote workers (only its shard's images)."""

    image_root: Path
    names: list[str]  # the prompts, one per class, in vocabulary order
    category_ids: list[int]  # the dataset's id of each name
    selection: Selection
    output: Path
    provenance: ProposalProvenance
    model_dir: Path
    device: str


@dataclass
class ShardOutcome:
    shard_id: int
    images: int = 0
    boxes: int = 0
    failed: int = 0
    error: str = ""  # the shard itself failed (a distributor that goes on reports it here)


def prompt_name(name: str) -> str:
    """A category name as a detector reads it: LVIS's ``trash_can`` -> ``trash can``."""
    return " ".join(name.replace("_", " ").split())


def propose_shard(
    shard_id: int, entries: Sequence[ImageEntry], work: ProposeWork, detector: Detector, writer: ProposalWriter
) -> ShardOutcome:
    """Detect on each image of the shard and write the shard's file. An image that cannot be read
    (missing, undecodable, another size than its entry) is recorded with its reason and skipped."""
    source = ImageSource(work.image_root, {entry.id: entry for entry in entries})
    category_ids = np.asarray(work.category_ids, np.int64)
    record = ShardRecord(shard_id, len(entries))
    for entry in sorted(entries, key=lambda e: e.id):
        try:
            image = source.load(entry.id)
        except (ImageDecodeError, DatasetError) as err:
            logger.warning("image %d: %s", entry.id, err)
            record.failed[str(entry.id)] = str(err)
            continue
        found = detect_image(detector, image, work.names, work.selection)
        record.results += records(entry.id, found.xyxy, category_ids[found.classes], found.scores)
    writer.write_shard(record)
    return ShardOutcome(shard_id, len(entries), len(record.results), len(record.failed))

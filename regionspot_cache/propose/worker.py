"""The one worker function every distributor calls: a shard of images -> its shard file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from regionspot_cache.choices import ProposalPrompt
from regionspot_cache.data.datasets import Category, DatasetError, ImageEntry
from regionspot_cache.data.images import ImageDecodeError, ImageSource
from regionspot_cache.data.proposals import NO_CLASS, ProposalProvenance
from regionspot_cache.errors import ConfigError
from regionspot_cache.propose.detectors import Detector
from regionspot_cache.propose.select import Selection, detect_image
from regionspot_cache.propose.writer import ProposalWriter, ShardRecord, records

logger = logging.getLogger(__name__)

Shard = tuple[int, list[ImageEntry]]


@dataclass
class ProposeWork:
    """What every shard of one run shares; sent whole to remote workers (only its shard's images)."""

    image_root: Path
    names: list[str]  # the prompts: one per class in vocabulary order, or the one generic prompt
    category_ids: list[int]  # the id each prompt's boxes are written with (-1: no class)
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


DEFAULT_AGNOSTIC_PROMPT = "object"  # a generic word the open detectors' papers prompt for any object


@dataclass(frozen=True)
class Prompting:
    """What the detector is prompted with (``ProposalPrompt``): the vocabulary's names, or ``text`` alone."""

    mode: ProposalPrompt = ProposalPrompt.VOCABULARY
    text: str = DEFAULT_AGNOSTIC_PROMPT

    def validate(self) -> Prompting:
        mode = ProposalPrompt.parse(self.mode, "prompt")
        if not mode.keeps_classes and not prompt_name(self.text):
            raise ConfigError("the agnostic prompt is empty: give the detector a word such as 'object'")
        return Prompting(mode, self.text)

    @property
    def recorded_text(self) -> str:
        """The generic prompt as the provenance records it (none when prompting with the vocabulary)."""
        return "" if self.mode.keeps_classes else prompt_name(self.text)

    def prompts(self, categories: Sequence[Category]) -> tuple[list[str], list[int]]:
        """The prompts, and the category id each box found with one is written with."""
        if self.mode.keeps_classes:
            return [prompt_name(c.name) for c in categories], [c.id for c in categories]
        return [self.recorded_text], [NO_CLASS]


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

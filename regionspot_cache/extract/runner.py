"""Phase 1: run the frozen encoders once per image and write the feature cache.

The runner assembles the parts it is handed (clip-retrieval's shape): the dataset, the cache
target (where, which kind, which boxes), the loaded encoders and a distributor. ``plan`` splits
the dataset into shards and picks those still to extract; ``reader`` decodes and resizes in
data-loading workers, ``mapper`` runs SAM and CLIP, ``worker`` commits shard after shard through
the one ``CacheWriter``, and a ``distribute`` distributor decides where shards run (this process,
or dask tasks). Committed shards are skipped, so re-running resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from regionspot_cache import __version__
from regionspot_cache.cache import CacheFormatError, CacheWriter, Provenance, exclusive_extraction
from regionspot_cache.cache.format import record_extraction_cost
from regionspot_cache.config import ExtractConfig, ModelsConfig
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders
from regionspot_cache.extract.distribute import Distributor, ExtractionWork, InProcess, ShardOutcome
from regionspot_cache.extract.plan import (
    check_images_unchanged,
    check_inputs_unchanged,
    pending_shards,
    planned_shards,
    shard_entries,
)
from regionspot_cache.extract.worker import ExtractCounts
from regionspot_cache.identity import CacheKind
from regionspot_cache.progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class ExtractSummary(ExtractCounts):
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    failed_shards: dict[int, str] = field(default_factory=dict)

    def record(self, outcome: ShardOutcome) -> None:
        if outcome.result is None:
            self.failed_shards[outcome.shard_id] = outcome.error
            return
        self.add(outcome.result)
        self.shards_written += 1


@dataclass(frozen=True)
class CacheTarget:
    """The cache an extraction writes: where it is, its kind, and the source of its boxes
    (``gt`` or the id of a proposals file), which its identity records."""

    root: Path
    kind: CacheKind = CacheKind()
    box_source: str = "gt"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


def run_extraction(
    dataset: DetectionDataset,
    target: CacheTarget,
    encoders: FrozenEncoders,
    config: ExtractConfig,
    distributor: Distributor | None = None,
    only_shards: set[int] | None = None,
) -> ExtractSummary:
    """Extract every shard of ``dataset`` that the ``target`` cache does not hold yet.

    Arguments:
      dataset: images (``ImageEntry``: id, file, size) and their boxes (``BoxSet``: (N, 4) float32
        x1 y1 x2 y2 in original pixels, category ids, scores).
      target: the cache to create or resume, its kind (plain, proposals borrowing a base cache's
        feature maps: then only SAM runs, view of a base cache) and box source; its identity
        (models, boxes, shard size, kind) must match.
      encoders: the loaded SAM and CLIP (``extract_dataset`` loads them from a ``ModelsConfig``);
        ``config.preprocess`` is applied to them here, once.
      config: batch size, shard size, loader workers, device, strictness, preprocessing.
      distributor: ``InProcess()`` (default) or ``Dask(scheduler, workers, retries)``.
      only_shards: extract only these shard ids (``repair``).

    Returns:
      An ``ExtractSummary``: counts of images, boxes, failures, shards written / skipped / failed
      (``failed_shards``: shard id -> error, from distributors that go on after a failed shard).
    """
    config.validate()  # the caller may have assigned fields since construction
    distributor = distributor or InProcess()
    # One thread count for every process that encodes (see ExtractConfig.threads).
    config = replace(config, threads=config.threads or torch.get_num_threads())
    encoders = encoders.with_preprocess(config.preprocess)  # the same models, the recipe's image preprocessing
    started = time.perf_counter()
    with exclusive_extraction(target.root):
        writer = prepare_cache(dataset, target, encoders, config)
        shards = list(shard_entries(dataset.images, config.shard_size))
        committed = writer.committed_shards()
        check_inputs_unchanged(writer, dataset, [shard for shard in shards if shard[0] in committed])
        if config.check_images and committed:
            check_images_unchanged(writer, dataset, committed)
        pending = pending_shards(shards, committed, only_shards)
        summary = ExtractSummary(shards_skipped=len(shards) - len(pending))
        work = ExtractionWork(dataset, target.root, encoders.spec, config, writer.provenance)
        with ExtractProgress(dataset.name, sum(len(entries) for _, entries in pending)) as progress:
            for outcome in distributor.run(work, pending, encoders, writer, progress.advance):
                summary.record(outcome)
    summary.seconds = time.perf_counter() - started
    record_extraction_cost(target.root, summary.seconds, summary.images)
    return summary


def extract_dataset(
    dataset: DetectionDataset,
    target: CacheTarget,
    models: ModelsConfig,
    config: ExtractConfig,
    distributor: Distributor | None = None,
) -> ExtractSummary:
    """The front door: ``run_extraction`` with the encoders ``models`` names (``load_encoders``)."""
    config.validate()
    return run_extraction(dataset, target, load_encoders(models, config, distributor), config, distributor)


def load_encoders(models: ModelsConfig, config: ExtractConfig, distributor: Distributor | None = None) -> FrozenEncoders:
    """The encoders ``models`` names, with ``config.preprocess``, on the device where ``distributor``
    (default this process) wants the runner's own: the one that computes the cache's identity and vocabulary."""
    return load_frozen_encoders(models, (distributor or InProcess()).setup_device(config), config.preprocess)


def make_provenance(
    dataset: DetectionDataset, target: CacheTarget, encoders: FrozenEncoders, config: ExtractConfig
) -> Provenance:
    """The identity of ``target`` extracted from ``dataset`` by ``encoders`` (with
    ``config.preprocess`` already applied to them)."""
    return Provenance(
        dataset=dataset.name,
        box_source=target.box_source,
        shard_size=config.shard_size,
        planned_shards=planned_shards(dataset.images, config.shard_size),
        sam=encoders.sam_provenance(),
        clip=encoders.clip_provenance(),
        package_version=__version__,
        weights=encoders.weight_files(),
        kind=target.kind,
        feature_dtype=config.feature_dtype,
    )


def prepare_cache(dataset: DetectionDataset, target: CacheTarget, encoders: FrozenEncoders, config: ExtractConfig) -> CacheWriter:
    """Create or reopen the cache (identity checked) and store the dataset's vocabulary."""
    config.validate()
    writer = CacheWriter(target.root, make_provenance(dataset, target, encoders, config))
    if not writer.has_vocabulary(dataset.name) or _categories_changed(writer, dataset):
        embeddings = encoders.clip.text_embeddings([c.name for c in dataset.categories], config.text_recipe)
        writer.write_vocabulary(dataset.name, dataset.categories, embeddings.float().cpu().numpy(), config.text_recipe)
        return writer
    recorded = writer.vocabulary_text_recipe(dataset.name)
    if recorded != config.text_recipe:
        raise CacheFormatError(
            f"{writer.location}: vocabulary {dataset.name!r} was built with text recipe {recorded!r}, "
            f"this run asks for {config.text_recipe!r} (extract.text_recipe)"
        )
    return writer


def _categories_changed(writer: CacheWriter, dataset: DetectionDataset) -> bool:
    """Whether the dataset's categories (ids and names) differ from the vocabulary the cache
    recorded, e.g. a category renamed in the annotation file: the vocabulary (text embeddings only,
    no feature depends on it) is then written again rather than keeping the old names."""
    changed = writer.vocabulary_categories(dataset.name) != [(c.id, c.name) for c in dataset.categories]
    if changed:
        logger.warning(
            "%s: the categories of %r changed since its vocabulary was written; writing it again", writer.root, dataset.name
        )
    return changed


class ExtractProgress:
    """A rich bar with images/s, boxes/s and ETA (rates exclude model loading)."""

    def __init__(self, name: str, total: int):
        self._context = progress_bar(f"extract {name}", total, "{task.fields[rate]}")
        self.images = self.boxes = 0

    def __enter__(self) -> ExtractProgress:
        self.bar, self.task = self._context.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def advance(self, images: int, boxes: int) -> None:
        self.images, self.boxes = self.images + images, self.boxes + boxes
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, advance=images, rate=f"{self.images / elapsed:.3g} img/s {self.boxes / elapsed:.3g} box/s")

"""Phase 1: run the frozen encoders once per image and write the feature cache.

The runner assembles the parts (clip-retrieval's shape): ``reader`` decodes and resizes in
data-loading workers, ``mapper`` runs SAM and CLIP, ``worker`` commits shard after shard through
the one ``CacheWriter``, and a ``distribute`` distributor decides where shards run (this process,
or dask tasks). Committed shards are skipped, so re-running resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from regionspot_cache import __version__
from regionspot_cache.cache import CacheWriter, Provenance, exclusive_extraction
from regionspot_cache.cache.format import (
    FEATURE_MAPS_BORROWED,
    FEATURE_MAPS_CACHE,
    FEATURE_MAPS_OWN,
    VIEW_BASE_CACHE,
    CacheFormatError,
    ViewIdentity,
    record_extraction_cost,
)
from regionspot_cache.config import ExtractConfig, ModelsConfig
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders
from regionspot_cache.extract.distribute import Distributor, ExtractionWork, InProcess, ShardOutcome
from regionspot_cache.extract.worker import ExtractCounts, Shard, shard_entries, shard_input_digest
from regionspot_cache.progress import progress_bar


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


def run_extraction(
    dataset: DetectionDataset,
    cache_dir: Path | str,
    models: ModelsConfig,
    config: ExtractConfig,
    box_source: str = "gt",
    encoders: FrozenEncoders | None = None,
    borrow_maps_from: str | None = None,
    only_shards: set[int] | None = None,
    distributor: Distributor | None = None,
    view: ViewIdentity | None = None,
) -> ExtractSummary:
    """Extract every shard of ``dataset`` that ``cache_dir`` does not hold yet.

    Arguments:
      dataset: images (``ImageEntry``: id, file, size) and their boxes (``BoxSet``: (N, 4) float32
        x1 y1 x2 y2 in original pixels, category ids, scores).
      cache_dir: the cache to create or resume; its identity (models, boxes, shard size) must match.
      models: the SAM and CLIP to load (``encoders``, if given, are used instead in this process).
      config: batch size, shard size, loader workers, device, strictness.
      box_source: ``gt`` or the id of a proposals file, recorded in the cache's identity.
      borrow_maps_from: for a proposals cache, the path (relative to it) of the cache whose CLIP feature
        maps it borrows: then only SAM runs.
      only_shards: extract only these shard ids (``repair``).
      distributor: ``InProcess()`` (default) or ``Dask(scheduler, workers, retries)``.
      view: for a view cache (extract/views.py), the augmented view its images are seen through.

    Returns:
      An ``ExtractSummary``: counts of images, boxes, failures, shards written / skipped / failed
      (``failed_shards``: shard id -> error, from distributors that go on after a failed shard).
    """
    config.validate()  # the caller may have assigned fields since construction
    distributor = distributor or InProcess()
    # One thread count for every process that encodes (see ExtractConfig.threads).
    config = replace(config, threads=config.threads or torch.get_num_threads())
    started = time.perf_counter()
    with exclusive_extraction(cache_dir):
        encoders = encoders or load_frozen_encoders(models, distributor.setup_device(config))
        writer = prepare_cache(dataset, cache_dir, encoders, config, box_source, borrow_maps_from, view)
        shards = list(shard_entries(dataset.images, config.shard_size))
        committed = writer.committed_shards()
        check_inputs_unchanged(writer, dataset, [shard for shard in shards if shard[0] in committed])
        pending = pending_shards(shards, committed, only_shards)
        summary = ExtractSummary(shards_skipped=len(shards) - len(pending))
        work = ExtractionWork(dataset, Path(cache_dir), models, config, writer.provenance)
        with ExtractProgress(dataset.name, sum(len(entries) for _, entries in pending)) as progress:
            for outcome in distributor.run(work, pending, encoders, writer, progress.advance):
                summary.record(outcome)
    summary.seconds = time.perf_counter() - started
    record_extraction_cost(Path(cache_dir), summary.seconds, summary.images)
    return summary


def check_inputs_unchanged(writer: CacheWriter, dataset: DetectionDataset, committed: Sequence[Shard]) -> None:
    """Refuse to skip committed shards whose images or boxes have changed since they were
    extracted (an edited annotation file under the same dataset name): they would be stale."""
    changed = [shard_id for shard_id, entries in committed
               if writer.recorded_input_digest(shard_id) not in (None, shard_input_digest(dataset, entries))]
    if changed:
        names = ", ".join(f"{shard_id:06d}" for shard_id in changed[:8]) + (" ..." if len(changed) > 8 else "")
        raise CacheFormatError(
            f"{writer.root}: shards {names} were extracted from other images or boxes than {dataset.name!r} has now "
            "(an edited annotation or proposals file?), so their features would be stale. Extract into a new cache, "
            "or delete those shard directories under shards/ and re-run to extract only them again")


def pending_shards(shards: Sequence[Shard], committed: set[int], only: set[int] | None) -> list[Shard]:
    """The shards still to extract: not committed, and among ``only`` when given."""
    return [(i, entries) for i, entries in shards if i not in committed and (only is None or i in only)]


def make_provenance(dataset: DetectionDataset, encoders: FrozenEncoders, config: ExtractConfig, box_source: str,
                    borrow_maps_from: str | None = None, view: ViewIdentity | None = None) -> Provenance:
    """``borrow_maps_from``: for a proposals cache, the path (relative to it) of the cache whose
    feature maps it borrows. ``view``: for a view cache, its view (its base cache is ``..``/``..``)."""
    paths = encoders.paths() if borrow_maps_from is None else {**encoders.paths(), FEATURE_MAPS_CACHE: borrow_maps_from}
    encoders = encoders.with_preprocess(config.preprocess)
    if view is not None:
        paths[VIEW_BASE_CACHE] = "../.."
    return Provenance(
        dataset=dataset.name,
        box_source=box_source,
        shard_size=config.shard_size,
        planned_shards=-(-len(dataset.images) // config.shard_size),
        sam=encoders.sam_provenance(),
        clip=encoders.clip_provenance(),
        package_version=__version__,
        paths=paths,
        feature_maps=FEATURE_MAPS_OWN if borrow_maps_from is None else FEATURE_MAPS_BORROWED,
        feature_dtype=config.feature_dtype,
        view=view,
    )


def prepare_cache(dataset: DetectionDataset, cache_dir: Path | str, encoders: FrozenEncoders, config: ExtractConfig,
                  box_source: str, borrow_maps_from: str | None = None, view: ViewIdentity | None = None) -> CacheWriter:
    """Create or reopen the cache (identity checked) and store the dataset's vocabulary."""
    config.validate()
    writer = CacheWriter(cache_dir, make_provenance(dataset, encoders, config, box_source, borrow_maps_from, view))
    if not writer.has_vocabulary(dataset.name):
        embeddings = encoders.clip.text_embeddings([c.name for c in dataset.categories], config.text_recipe)
        writer.write_vocabulary(dataset.name, dataset.categories, embeddings.float().cpu().numpy(), config.text_recipe)
        return writer
    recorded = writer.vocabulary_text_recipe(dataset.name)
    if recorded != config.text_recipe:
        raise CacheFormatError(f"{cache_dir}: vocabulary {dataset.name!r} was built with text recipe {recorded!r}, "
                               f"this run asks for {config.text_recipe!r} (extract.text_recipe)")
    return writer


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
        self.bar.update(self.task, advance=images,
                        rate=f"{self.images / elapsed:.3g} img/s {self.boxes / elapsed:.3g} box/s")



"""Phase 1: run the frozen encoders once per image and write the feature cache.

Split as reader (decode + resize in data-loading workers), mapper (SAM and CLIP, batched over
images; all boxes of an image through the mask decoder together), writer (``CacheWriter``, one
committed shard at a time). Committed shards are skipped, so re-running resumes.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from regionspot_cache import __version__
from regionspot_cache.cache import CacheWriter, ImageFeatures, Provenance, exclusive_extraction
from regionspot_cache.cache.format import FEATURE_MAPS_BORROWED, FEATURE_MAPS_CACHE, FEATURE_MAPS_OWN, STATUS_FAILED
from regionspot_cache.config import ExtractConfig, ModelsConfig
from regionspot_cache.data.datasets import DetectionDataset, ImageEntry
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders
from regionspot_cache.extract.mapper import NO_BOXES, FeatureMapper
from regionspot_cache.extract.reader import image_loader
from regionspot_cache.progress import console, progress_bar
from regionspot_cache.runtime import resolve_device


@dataclass
class ExtractSummary:
    images: int = 0
    boxes: int = 0
    failed: int = 0
    dropped_boxes: int = 0
    without_boxes: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    failed_shards: dict[int, str] = field(default_factory=dict)

    def add(self, shard: "ShardResult") -> None:
        self.images += shard.images
        self.boxes += shard.boxes
        self.failed += shard.failed
        self.dropped_boxes += shard.dropped_boxes
        self.without_boxes += shard.without_boxes
        self.bytes_written += shard.bytes_written
        self.shards_written += 1


def shard_entries(images: Sequence[ImageEntry], shard_size: int) -> Iterator[tuple[int, list[ImageEntry]]]:
    """Images in id order, ``shard_size`` per shard: the split depends only on the dataset."""
    ordered = sorted(images, key=lambda entry: entry.id)
    for shard_id, start in enumerate(range(0, len(ordered), shard_size)):
        yield shard_id, ordered[start : start + shard_size]


def make_provenance(dataset: DetectionDataset, encoders: FrozenEncoders, config: ExtractConfig, box_source: str,
                    maps_from: str | None = None) -> Provenance:
    """``maps_from``: for a proposals cache, the path (relative to it) of the cache whose
    feature maps it borrows."""
    paths = encoders.paths() if maps_from is None else {**encoders.paths(), FEATURE_MAPS_CACHE: maps_from}
    return Provenance(
        dataset=dataset.name,
        box_source=box_source,
        shard_size=config.shard_size,
        planned_shards=-(-len(dataset.images) // config.shard_size),
        sam=encoders.sam_provenance(),
        clip=encoders.clip_provenance(),
        package_version=__version__,
        paths=paths,
        feature_maps=FEATURE_MAPS_OWN if maps_from is None else FEATURE_MAPS_BORROWED,
        feature_dtype=config.feature_dtype,
    )


@dataclass
class ShardResult:
    shard_id: int
    images: int = 0
    boxes: int = 0
    failed: int = 0
    dropped_boxes: int = 0
    without_boxes: int = 0
    bytes_written: int = 0
    last_boxes: int = 0  # boxes of the last batch added, for progress

    def add(self, images: Sequence[ImageFeatures]) -> None:
        self.last_boxes = sum(len(r.boxes) for r in images if r.status != STATUS_FAILED)
        self.images += len(images)
        self.boxes += self.last_boxes
        self.failed += sum(r.status == STATUS_FAILED for r in images)
        self.dropped_boxes += sum(len(r.rejected_reasons) for r in images)
        self.without_boxes += sum(r.reason == NO_BOXES for r in images)


def extract_shards(
    shards: Sequence[tuple[int, list[ImageEntry]]],
    dataset: DetectionDataset,
    encoders: FrozenEncoders,
    writer: CacheWriter,
    config: ExtractConfig,
    on_batch: Callable[[int, int], None] = lambda images, boxes: None,
) -> Iterator[ShardResult]:
    """Encode and commit ``shards`` in order, yielding each one's result once committed.

    One data loader serves all the shards with batches that never cross a shard boundary, so
    decoding runs ahead across shards; a finished shard is committed on a background thread
    while the next one computes. ``on_batch(images, boxes)`` reports progress.
    """
    with_clip = writer.provenance.feature_maps == FEATURE_MAPS_OWN
    mapper = FeatureMapper(encoders, config, with_clip)
    batches = iter(image_loader(dataset, shards, encoders, config, with_clip))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rs-cache-commit") as committer:
        pending: Future | None = None
        for shard_id, entries in shards:
            result, features = ShardResult(shard_id), []
            for _ in range(-(-len(entries) // config.batch_size)):
                images = mapper(next(batches))
                if config.strict:
                    _raise_on_failure(images)
                features.extend(images)
                result.add(images)
                on_batch(len(images), result.last_boxes)
            if pending is not None:
                yield pending.result()
            pending = committer.submit(_commit, writer, result, features)
        if pending is not None:
            yield pending.result()


def _commit(writer: CacheWriter, result: ShardResult, features: list[ImageFeatures]) -> ShardResult:
    result.bytes_written = writer.write_shard(result.shard_id, features)
    return result


def extract_shard(shard_id: int, entries: list[ImageEntry], dataset: DetectionDataset, encoders: FrozenEncoders,
                  writer: CacheWriter, config: ExtractConfig) -> ShardResult:
    """Encode the images of one shard and commit it."""
    return next(extract_shards([(shard_id, entries)], dataset, encoders, writer, config))


def shard_dataset(dataset: DetectionDataset, entries: list[ImageEntry]) -> DetectionDataset:
    """The part of ``dataset`` one shard needs (what is sent to a worker)."""
    return replace(dataset, images=entries, boxes={e.id: dataset.boxes_of(e.id) for e in entries})


def prepare_cache(dataset: DetectionDataset, cache_dir: Path | str, encoders: FrozenEncoders, config: ExtractConfig,
                  box_source: str, maps_from: str | None = None) -> CacheWriter:
    """Create or reopen the cache (identity checked) and store the dataset's vocabulary."""
    config.validate()
    writer = CacheWriter(cache_dir, make_provenance(dataset, encoders, config, box_source, maps_from))
    if not writer.has_vocabulary(dataset.name):
        embeddings = encoders.clip.text_embeddings([c.name for c in dataset.categories])
        writer.write_vocabulary(dataset.name, dataset.categories, embeddings.float().cpu().numpy())
    return writer


def run_extraction(
    dataset: DetectionDataset,
    cache_dir: Path | str,
    models: ModelsConfig,
    config: ExtractConfig,
    box_source: str = "gt",
    encoders: FrozenEncoders | None = None,
    maps_from: str | None = None,
    only_shards: set[int] | None = None,
) -> ExtractSummary:
    """Extract, in this process, every shard of ``dataset`` (or of ``only_shards``) that
    ``cache_dir`` does not hold yet (``maps_from``: SAM tokens only, the feature maps being
    those of that cache)."""
    started = time.perf_counter()
    with exclusive_extraction(cache_dir):
        encoders = encoders or load_frozen_encoders(models, resolve_device(config.device))
        writer = prepare_cache(dataset, cache_dir, encoders, config, box_source, maps_from)
        summary = ExtractSummary()
        committed = writer.committed_shards()
        shards = list(shard_entries(dataset.images, config.shard_size))
        pending = [(shard_id, entries) for shard_id, entries in shards
                   if shard_id not in committed and (only_shards is None or shard_id in only_shards)]
        summary.shards_skipped = len(shards) - len(pending)
        with ExtractProgress(dataset.name, sum(len(entries) for _, entries in pending)) as progress:
            for result in extract_shards(pending, dataset, encoders, writer, config, progress.advance):
                summary.add(result)
    summary.seconds = time.perf_counter() - started
    return summary


class ExtractProgress:
    """A rich bar with images/s, boxes/s and ETA (rates exclude model loading)."""

    def __init__(self, name: str, total: int):
        self._context = progress_bar(f"extract {name}", total, "{task.fields[rate]}")
        self.images = self.boxes = 0

    def __enter__(self) -> "ExtractProgress":
        self.bar, self.task = self._context.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def advance(self, images: int, boxes: int) -> None:
        self.images, self.boxes = self.images + images, self.boxes + boxes
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, advance=images,
                        rate=f"{self.images / elapsed:.1f} img/s {self.boxes / elapsed:.1f} box/s")


class ExtractionError(ValueError):
    """Bad input met with ``strict`` on; shards committed before it stay committed."""


def _raise_on_failure(results: Sequence[ImageFeatures]) -> None:
    for result in results:
        if result.status == STATUS_FAILED:
            raise ExtractionError(f"--strict: image {result.image_id}: {result.reason}")
        if result.rejected_reasons:
            box = result.rejected_boxes.xyxy[0].tolist()
            raise ExtractionError(f"--strict: image {result.image_id} ({result.file_name}): box {box}: {result.rejected_reasons[0]}")


def print_summary(summary: ExtractSummary) -> None:
    console.print(
        f"extracted {summary.images} images ({summary.failed} failed, {summary.without_boxes} without boxes), "
        f"{summary.boxes} boxes "
        f"({summary.dropped_boxes} degenerate boxes rejected); shards written {summary.shards_written}, "
        f"skipped {summary.shards_skipped}; {summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s"
    )
    for shard_id, error in summary.failed_shards.items():
        console.print(f"[red]shard {shard_id} failed[/]: {error}")

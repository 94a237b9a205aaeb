"""Phase 1 worker: encode and commit shards. Every distributor runs this same function.

One data loader serves all the shards given, with batches that never cross a shard boundary, so
decoding runs ahead across shards; a finished shard is committed on a background thread while the
next one computes.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Sequence

from regionspot_cache.cache import CacheWriter, ImageFeatures
from regionspot_cache.cache.format import STATUS_FAILED
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import DetectionDataset
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.errors import ExtractionError
from regionspot_cache.extract.decode import device_pixels
from regionspot_cache.extract.mapper import NO_BOXES, FeatureMapper
from regionspot_cache.extract.plan import Shard, shard_input_digest
from regionspot_cache.extract.reader import image_loader
from regionspot_cache.extract.view_mapper import view_loading, view_mapper
from regionspot_cache.runtime.devices import torch_threads

OnBatch = Callable[[int, int], None]  # (images, boxes) just encoded, for progress


@dataclass
class ExtractCounts:
    """What an extraction produced; a shard's counts and a run's total add up the same way."""

    images: int = 0
    boxes: int = 0
    failed: int = 0
    dropped_boxes: int = 0
    without_boxes: int = 0
    bytes_written: int = 0
    # Time the mapper waited for the loader's next batch: when it is a large part of the run, the
    # device starves (more loader workers, or extract.decode = "device", would feed it).
    loader_wait_seconds: float = 0.0
    batches: int = 0

    @property
    def loader_wait_per_batch(self) -> float:
        return self.loader_wait_seconds / max(self.batches, 1)

    def add(self, other: ExtractCounts) -> None:
        for counter in fields(ExtractCounts):
            setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))

    @staticmethod
    def of(images: Sequence[ImageFeatures]) -> ExtractCounts:
        return ExtractCounts(
            images=len(images),
            boxes=sum(len(r.boxes) for r in images if r.status != STATUS_FAILED),
            failed=sum(r.status == STATUS_FAILED for r in images),
            dropped_boxes=sum(len(r.rejected_reasons) for r in images),
            without_boxes=sum(r.reason == NO_BOXES for r in images),
        )


@dataclass(kw_only=True)
class ShardResult(ExtractCounts):
    shard_id: int


def extract_shards(
    shards: Sequence[Shard],
    dataset: DetectionDataset,
    encoders: FrozenEncoders,
    writer: CacheWriter,
    config: ExtractConfig,
    on_batch: OnBatch = lambda images, boxes: None,
) -> Iterator[ShardResult]:
    """Encode and commit ``shards`` in order, yielding each one's result once committed.
    ``encoders`` come with ``config.preprocess`` applied. The cache's kind
    (``writer.provenance.kind``) says what to compute: a proposals cache, which borrows its
    feature maps, gets SAM tokens only; a view cache sees the images through its view."""
    kind = writer.provenance.kind
    with_clip, view = kind.owns_feature_maps, kind.view
    mapper = FeatureMapper(encoders, config, with_clip) if view is None else view_mapper(encoders, config, view)
    loading = view_loading(view)
    batches = iter(image_loader(dataset, shards, encoders, config, with_clip, **loading))
    pixels = device_pixels(encoders, config, with_clip, **loading)
    with torch_threads(config.threads), ThreadPoolExecutor(max_workers=1, thread_name_prefix="rs-cache-commit") as committer:
        pending: Future | None = None
        for shard_id, entries in shards:
            result, features, contents = ShardResult(shard_id=shard_id), [], {}
            for _ in range(-(-len(entries) // config.batch_size)):
                waited = time.perf_counter()
                batch = next(batches)
                result.loader_wait_seconds += time.perf_counter() - waited
                result.batches += 1
                contents.update((item.entry.id, item.content) for item in batch if item.content is not None)
                images = mapper(pixels(batch))
                if config.strict:
                    _raise_on_failure(images)
                features.extend(images)
                counts = ExtractCounts.of(images)
                result.add(counts)
                on_batch(counts.images, counts.boxes)
            if pending is not None:
                yield pending.result()
            digest = shard_input_digest(dataset, entries)
            pending = committer.submit(_commit, writer, result, features, digest, contents)
        if pending is not None:
            yield pending.result()


def _commit(
    writer: CacheWriter, result: ShardResult, features: list[ImageFeatures], input_digest: str, contents: dict[int, str]
) -> ShardResult:
    result.bytes_written = writer.write_shard(result.shard_id, features, input_digest, contents)
    return result


def _raise_on_failure(results: Sequence[ImageFeatures]) -> None:
    for result in results:
        if result.status == STATUS_FAILED:
            raise ExtractionError(f"--strict: image {result.image_id}: {result.reason}")
        if result.rejected_reasons:
            box = result.rejected_boxes.xyxy[0].tolist()
            raise ExtractionError(
                f"--strict: image {result.image_id} ({result.file_name}): box {box}: {result.rejected_reasons[0]}"
            )

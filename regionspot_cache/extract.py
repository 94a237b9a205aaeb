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

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .cache import CacheWriter, ImageFeatures, Provenance, exclusive_extraction
from .cache.format import FEATURE_MAPS_BORROWED, FEATURE_MAPS_CACHE, FEATURE_MAPS_OWN, STATUS_FAILED

NO_BOXES = "no boxes"  # kept (its feature map serves later proposals), with this reason
from .config import ExtractConfig, ModelsConfig
from .datasets import BoxSet, DatasetError, DetectionDataset, ImageEntry
from .encoders import FrozenEncoders, load_frozen_encoders
from .images import ImageDecodeError, load_rgb
from .progress import console, progress_bar
from .runtime import resolve_device


@dataclass
class LoadedImage:
    entry: ImageEntry
    boxes: BoxSet
    sam_pixels: torch.Tensor | None = None  # (3, h, w) uint8, long side 1024
    clip_pixels: torch.Tensor | None = None  # (3, H, W) float, normalised
    error: str = ""


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


class ImageReader(Dataset):
    """Decodes and resizes the images of one shard; never raises for a bad file."""

    def __init__(self, dataset: DetectionDataset, entries: Sequence[ImageEntry], sam_resize: Callable,
                 clip_preprocess: Callable | None, max_pixels: int | None = None):
        self.dataset = dataset
        self.max_pixels = max_pixels
        self.entries = list(entries)
        self.sam_resize = sam_resize
        self.clip_preprocess = clip_preprocess

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> LoadedImage:
        entry = self.entries[index]
        boxes = self.dataset.boxes_of(entry.id)
        try:
            path = self.dataset.image_path(entry)
            image = load_rgb(path, self.max_pixels)
        except (ImageDecodeError, DatasetError) as err:
            return LoadedImage(entry, boxes, error=str(err))
        if image.size != (entry.width, entry.height):
            return LoadedImage(
                entry, boxes,
                error=f"{path}: decoded size {image.size[0]}x{image.size[1]} differs from the annotation's "
                f"{entry.width}x{entry.height}",
            )
        clip_pixels = self.clip_preprocess(image) if self.clip_preprocess else None
        return LoadedImage(entry, boxes, self.sam_resize(np.asarray(image)), clip_pixels)


def split_boxes(boxes: BoxSet, width: int, height: int) -> tuple[BoxSet, BoxSet, list[str]]:
    """Clip boxes to the image; those left without area, not finite, or reaching more than the
    image's own size beyond an edge (corrupt coordinates, which clipping would turn into a
    plausible box) are rejected with a reason. Returns the kept boxes (clipped), the rejected ones
    (as given) and the reasons."""
    finite = np.isfinite(boxes.xyxy).all(axis=1)
    xyxy = np.nan_to_num(boxes.xyxy, nan=0.0, posinf=0.0, neginf=0.0)
    positive = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    xs, ys = xyxy[:, [0, 2]], xyxy[:, [1, 3]]
    near = ((xs >= -width) & (xs <= 2 * width)).all(axis=1) & ((ys >= -height) & (ys <= 2 * height)).all(axis=1)
    clipped = xyxy.copy()
    clipped[:, [0, 2]] = xs.clip(0, width)
    clipped[:, [1, 3]] = ys.clip(0, height)
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    keep = finite & positive & near & inside
    reasons = [
        "coordinates not finite" if not f else "zero or negative size" if not p
        else "coordinates far outside the image" if not n else "outside the image"
        for f, p, n in zip(finite[~keep], positive[~keep], near[~keep])
    ]
    kept = BoxSet(clipped[keep], boxes.category_ids[keep], boxes.scores[keep])
    rejected = BoxSet(boxes.xyxy[~keep], boxes.category_ids[~keep], boxes.scores[~keep])
    return kept, rejected, reasons


class FeatureMapper:
    """Runs SAM and CLIP on a batch of loaded images (SAM only when ``with_clip`` is False: for a
    proposals cache that borrows the feature maps of another cache)."""

    def __init__(self, encoders: FrozenEncoders, config: ExtractConfig, with_clip: bool = True):
        self.encoders = encoders
        self.config = config
        self.with_clip = with_clip
        self.device = encoders.sam.device

    def __call__(self, batch: Sequence[LoadedImage]) -> list[ImageFeatures]:
        good = [item for item in batch if not item.error]
        results = {item.entry.id: self._failed(item) for item in batch if item.error}
        if good:
            # bf16 on CUDA (tensor cores); fp32 on the CPU, where autocast would only slow down.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                embeddings = self.encoders.sam.embed_images([item.sam_pixels for item in good])
                maps = (self.encoders.clip.feature_maps(torch.stack([item.clip_pixels for item in good]))
                        if self.with_clip else [None] * len(good))
                for item, embedding, feature_map in zip(good, embeddings, maps):
                    boxes, rejected, reasons = split_boxes(item.boxes, item.entry.width, item.entry.height)
                    tokens = self.encoders.sam.box_tokens(
                        embedding, boxes.xyxy, (item.entry.height, item.entry.width),
                        self.config.boxes_per_decoder_call,
                    )
                    problem = _non_finite(feature_map, tokens)
                    if problem:  # never let NaN/Inf into the cache: it would poison training
                        results[item.entry.id] = self._failed(replace(item, error=problem))
                        continue
                    results[item.entry.id] = ImageFeatures(
                        item.entry.id, item.entry.file_name, item.entry.width, item.entry.height, boxes,
                        feature_map=None if feature_map is None else _to_float16(feature_map),
                        box_tokens=_to_float16(tokens),
                        rejected_boxes=rejected, rejected_reasons=reasons,
                        reason="" if len(boxes) else NO_BOXES,
                    )
        return [results[item.entry.id] for item in batch]

    @staticmethod
    def _failed(item: LoadedImage) -> ImageFeatures:
        entry = item.entry
        return ImageFeatures(entry.id, entry.file_name, entry.width, entry.height, status=STATUS_FAILED, reason=item.error)


def _non_finite(feature_map: torch.Tensor | None, tokens: torch.Tensor) -> str:
    """Why the encoder outputs of an image cannot be cached, or "" if they can. Checked after
    the float16 cast too: values beyond 65504 overflow to infinity there."""
    for name, values in (("CLIP feature map", feature_map), ("SAM box tokens", tokens)):
        if values is not None and not torch.isfinite(values.float().to(torch.float16)).all():
            return f"non-finite values (NaN or Inf) in the {name}"
    return ""


def _to_float16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy().astype(np.float16)


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
    batches = iter(_loader(dataset, shards, encoders, config, with_clip))
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


def _loader(dataset: DetectionDataset, shards: Sequence[tuple[int, list[ImageEntry]]], encoders: FrozenEncoders,
            config: ExtractConfig, with_clip: bool = True) -> DataLoader:
    """Batches of ``config.batch_size`` images that never cross a shard boundary."""
    entries = [entry for _, shard in shards for entry in shard]
    batches, start = [], 0
    for _, shard in shards:
        batches += [list(range(i, min(i + config.batch_size, start + len(shard))))
                    for i in range(start, start + len(shard), config.batch_size)]
        start += len(shard)
    reader = ImageReader(dataset, entries, encoders.sam.resizer(), encoders.clip.preprocessor() if with_clip else None,
                         config.max_image_pixels)
    return DataLoader(
        reader,
        batch_sampler=batches,
        num_workers=config.num_workers,
        collate_fn=list,
        pin_memory=encoders.sam.device.type == "cuda",
    )


def print_summary(summary: ExtractSummary) -> None:
    console.print(
        f"extracted {summary.images} images ({summary.failed} failed, {summary.without_boxes} without boxes), "
        f"{summary.boxes} boxes "
        f"({summary.dropped_boxes} degenerate boxes rejected); shards written {summary.shards_written}, "
        f"skipped {summary.shards_skipped}; {summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s"
    )
    for shard_id, error in summary.failed_shards.items():
        console.print(f"[red]shard {shard_id} failed[/]: {error}")

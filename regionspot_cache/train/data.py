"""Training data from one or more feature caches: reading, box capping, collation.

Every batch comes from one dataset (a cache with its own vocabulary), chosen per step with the
configured sampling weights. The plan is a pure function of (seed, step), so the order of
batches and boxes does not depend on the number of loader workers or of training processes, and
a resumed run can start at any step without replaying the earlier ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from regionspot_cache.cache import CacheReader, Vocabulary
from regionspot_cache.cache.completeness import Completeness, check_complete
from regionspot_cache.data.views import IDENTITY
from regionspot_cache.errors import CacheFormatError, ConfigError, DatasetError
from regionspot_cache.runtime.devices import check_worker_sockets, usable_cpus
from regionspot_cache.runtime.records import differences
from regionspot_cache.train.order import Key, RankBatchSampler
from regionspot_cache.train.views import CachedView, open_views, pick_view


@dataclass(frozen=True)
class RegionItem:
    """One image as training reads it (float16, as cached): the SAM tokens of its kept boxes, its
    CLIP feature map, and the boxes' labels; what the dataset hands to ``collate_regions``."""

    tokens: np.ndarray  # (N, 256)
    feature_map: np.ndarray  # (L, width)
    labels: np.ndarray  # (N,) int64 index into the source's vocabulary
    source: int = 0  # which training dataset (and so which vocabulary) the image comes from


@dataclass
class RegionBatch:
    tokens: torch.Tensor  # (B, N, 256)
    feature_maps: torch.Tensor  # (B, L, width)
    box_mask: torch.Tensor  # (B, N) True for real boxes; padding is masked out of attention and loss
    labels: torch.Tensor  # (B, N) index into the source's vocabulary, -1 for padding
    source: int = 0  # which training dataset (and so which vocabulary) the batch comes from

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "RegionBatch":
        """On ``device``, tokens and maps converted there to ``dtype`` (the loader delivers float16)."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        tokens, maps = move(self.tokens).to(dtype), move(self.feature_maps).to(dtype)
        return RegionBatch(tokens, maps, move(self.box_mask), move(self.labels), self.source)


class CachedRegions(Dataset):
    """Images of one cache with their boxes labelled in ``vocabulary``. Keys are
    ``(epoch, index)`` so that the view read (of ``views``; default the identity alone) and the
    random box capping are functions of the key alone."""

    def __init__(
        self,
        reader: CacheReader,
        vocabulary: Vocabulary,
        max_boxes: int,
        seed: int,
        source: int = 0,
        views: Sequence[CachedView] | None = None,
    ):
        self.reader = reader
        self.max_boxes = max_boxes
        self.seed = seed
        self.source = source
        self.views = list(views) if views else [CachedView(IDENTITY, reader, reader)]
        labels = {id(v.boxes): vocabulary_index(v.boxes.box_category_ids, vocabulary.category_ids) for v in self.views}
        self.view_labels = [labels[id(v.boxes)] for v in self.views]
        usable = [self._usable_images(view, view_labels) for view, view_labels in zip(self.views, self.view_labels)]
        # Per image, the views it can be read through: extracted, with a labelled box left in the view.
        candidates = {i: [v for v, ids in enumerate(usable) if i in ids] for i in reader.image_ids()}
        self.image_ids = [i for i, views_of_image in candidates.items() if views_of_image]
        self.candidates = [candidates[i] for i in self.image_ids]
        if not self.image_ids:
            raise DatasetError(f"{reader.location}: no image has a box labelled with vocabulary {vocabulary.name!r}")

    @staticmethod
    def _usable_images(view: CachedView, labels: np.ndarray) -> set[int]:
        labelled = set(np.unique(view.boxes.boxes["image_id"].to_numpy()[labels >= 0]).tolist())
        return labelled & set(view.maps.image_ids()) & set(view.boxes.image_ids())

    def __len__(self) -> int:
        return len(self.image_ids)

    def shards(self) -> np.ndarray:
        """(len(self),) the shard each index's image is stored in (of the cache itself: a view or
        a proposals cache borrowing maps keeps its images in the same shards)."""
        rows = np.asarray([self.reader.row_of(i) for i in self.image_ids], dtype=np.int64)
        return self.reader.images.column("shard").to_numpy()[rows].astype(np.int64)

    def view_of(self, key: tuple[int, int]) -> int:
        """Index in ``views`` of the view the key reads."""
        epoch, index = key
        return pick_view(self.candidates[index], self.seed, self.source, epoch, index)

    def boxes_of(self, key: tuple[int, int], view: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(indices among the image's boxes in ``view``, their labels): the labelled boxes, at most ``max_boxes``."""
        epoch, index = key
        labels = self.view_labels[view][self.views[view].boxes.box_rows(self.image_ids[index])]
        keep = np.flatnonzero(labels >= 0)
        if len(keep) > self.max_boxes:
            rng = np.random.default_rng([self.seed, self.source, epoch, index])
            keep = np.sort(rng.choice(keep, self.max_boxes, replace=False))
        return keep, labels[keep]

    def __getitem__(self, key: tuple[int, int]) -> RegionItem:
        return self.read([key])[0]

    def map_shape(self) -> tuple[int, int]:
        """(tokens, width) of a feature map (every view's: they share the CLIP)."""
        clip = self.reader.provenance.clip
        return clip.num_tokens, clip.width

    def read(
        self, keys: Sequence[tuple[int, int]], maps: np.ndarray | None = None, at: Sequence[int] | None = None
    ) -> list[RegionItem]:
        """The item of each key; the feature maps of each view gathered in one call, straight
        into ``maps[at[k]]`` when ``maps`` is given (the batch's own buffer), else a new array."""
        image_ids = [self.image_ids[index] for _, index in keys]
        picked = [self.view_of(key) for key in keys]
        if maps is None:
            maps, at = np.empty((len(keys), *self.map_shape()), np.float16), None
        at = np.arange(len(keys)) if at is None else np.asarray(at, dtype=np.int64)
        items: dict[int, RegionItem] = {}  # by position in keys
        for view in sorted(set(picked)):
            where = [i for i, v in enumerate(picked) if v == view]
            self.views[view].maps.feature_maps([image_ids[i] for i in where], maps, at[where])
            for i in where:
                keep, labels = self.boxes_of(keys[i], view)
                tokens = self.views[view].boxes.box_tokens(image_ids[i], keep)
                items[i] = RegionItem(tokens, maps[at[i]], labels, self.source)
        return [items[i] for i in range(len(keys))]


def vocabulary_index(category_ids: np.ndarray, vocabulary_ids: np.ndarray) -> np.ndarray:
    """Index of each category id in ``vocabulary_ids``, -1 where it is not in the vocabulary."""
    vocabulary_ids = np.asarray(vocabulary_ids, dtype=np.int64)
    if not len(vocabulary_ids):
        return np.full(len(category_ids), -1, dtype=np.int64)
    order = np.argsort(vocabulary_ids, kind="stable")
    found = order[np.searchsorted(vocabulary_ids, category_ids, sorter=order).clip(max=len(order) - 1)]
    return np.where(vocabulary_ids[found] == category_ids, found, -1)


class MultiSourceRegions(Dataset):
    """Several ``CachedRegions`` behind one key space ``(source, epoch, index)``."""

    def __init__(self, sources: Sequence[CachedRegions]):
        self.sources = list(sources)

    def sizes(self) -> list[int]:
        return [len(source) for source in self.sources]

    def __getitem__(self, key: Key) -> RegionItem:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> list[RegionItem]:
        """A batch's items, read source by source in one batched read each (the DataLoader calls
        this with the whole batch instead of one ``__getitem__`` per image). A batch of one
        source (every batch the plan makes) is a ``ReadBatch``: its maps read into the batch tensor."""
        sources = sorted({key[0] for key in keys})
        batch = None
        if len(sources) == 1:
            batch = batch_tensor((len(keys), *self.sources[sources[0]].map_shape()), torch.float16)
        items: dict[int, RegionItem] = {}  # by position in keys
        for source in sources:
            where = [i for i, key in enumerate(keys) if key[0] == source]
            read = self.sources[source].read([keys[i][1:] for i in where], None if batch is None else batch.numpy(), where)
            for i, item in zip(where, read):
                items[i] = replace(item, source=source)  # the index here picks the vocabulary in the loss
        ordered = [items[i] for i in range(len(keys))]
        return ordered if batch is None else ReadBatch(ordered, batch)


class ReadBatch(list):
    """A batch's items as ``MultiSourceRegions`` reads them, their feature maps the rows of
    ``maps``: the batch tensor itself (in shared memory in a loader worker), which
    ``collate_regions`` takes as it is instead of stacking a copy of it."""

    def __init__(self, items: Sequence[RegionItem], maps: torch.Tensor):
        super().__init__(items)
        self.maps = maps


def batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; in a loader worker, in shared memory from the start
    (as torch's default collate does): a tensor sent to the training process is otherwise copied
    once more, into shared memory, on its way (a 4.8 MB copy per BB batch of 16)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto.untyped_storage()._new_shared(int(np.prod(shape)) * proto.element_size())
    return proto.new_empty(0).set_(storage).view(tuple(shape))


def collate_regions(items: list[RegionItem]) -> RegionBatch:
    """Pad the images of a batch to the largest box count; padded boxes get label -1 and are
    masked out of attention and of the loss (the released code instead repeats real boxes).
    Tokens and maps stay float16 (half the bytes to copy); ``RegionBatch.to`` converts on the device."""
    sources = {item.source for item in items}
    if len(sources) != 1:
        raise ValueError(f"a batch mixes datasets {sorted(sources)}")
    count = max(len(item.labels) for item in items)
    batch, token_dim = len(items), items[0].tokens.shape[1]
    # Filled through numpy views of the same memory: torch's ops on a batch this size run on its
    # intra-op threads, whose spinning after each op took a sixth of the training process's CPU
    # beside a fetch from object storage (and its slice assignments cost about 2 ms a batch).
    tokens, labels = batch_tensor((batch, count, token_dim), torch.float16), batch_tensor((batch, count), torch.long)
    box_mask = batch_tensor((batch, count), torch.bool)
    token_rows, label_rows = tokens.numpy(), labels.numpy()
    token_rows.fill(0)
    label_rows.fill(-1)
    for row, item in enumerate(items):
        token_rows[row, : len(item.labels)] = item.tokens
        label_rows[row, : len(item.labels)] = item.labels
    np.greater_equal(label_rows, 0, out=box_mask.numpy())
    if isinstance(items, ReadBatch):
        maps = items.maps
    else:
        maps = batch_tensor((batch, *items[0].feature_map.shape), torch.float16)
        np.stack([np.asarray(item.feature_map, dtype=np.float16) for item in items], out=maps.numpy())
    return RegionBatch(tokens, maps, box_mask, labels, sources.pop())


def region_loader(
    dataset: MultiSourceRegions,
    sampler: RankBatchSampler,
    num_workers: int,
    prefetch_batches: int,
    pin_memory: bool,
) -> DataLoader:
    """Batches read by background workers, ``prefetch_batches`` ahead per worker, into pinned
    memory on CUDA so host-to-device copies overlap compute. ``num_workers`` is capped at the CPUs
    this process may use (a recipe's 8 on a 2-core machine only adds processes and a torch warning)."""
    num_workers = fitted_workers(num_workers)
    if num_workers:
        check_worker_sockets("train.num_workers")
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_regions,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_batches if num_workers else None,
        persistent_workers=num_workers > 0,
        # Its own generator: creating the iterator must not draw from the global RNG (dropout's),
        # or a resumed run would see other dropout masks.
        generator=torch.Generator().manual_seed(0),
    )


def fitted_workers(configured: int) -> int:
    """``configured`` loader workers, at most one per usable CPU (logged when fewer)."""
    fitted = min(configured, usable_cpus())
    if fitted < configured:
        logging.getLogger(__name__).info("train.num_workers %d: using %d, the CPUs this process may use", configured, fitted)
    return fitted


@dataclass
class TrainSource:
    """A training dataset: its cache, the vocabulary its boxes are labelled in, its text embeddings."""

    cache: Path
    reader: CacheReader
    vocabulary: Vocabulary
    views: list[CachedView] | None = None  # None: the identity alone
    # With allow_partial: the cache and view caches with shards missing (recorded with the head).
    partial: list[Completeness] = field(default_factory=list)


def open_sources(
    caches: Sequence[Path | str], vocabularies: Sequence[str], views: Sequence[str] = (), allow_partial: bool = False
) -> list[TrainSource]:
    """Open each cache with its vocabulary (default: the cache's own dataset) and its ``views``
    (view ids, "identity" for the images themselves; empty: all it has); all must come from the
    same SAM and CLIP, since one head is trained on all of them. A cache or view cache with shards
    missing is refused unless ``allow_partial``."""
    if vocabularies and len(vocabularies) != len(caches):
        raise ConfigError(f"{len(vocabularies)} vocabularies given for {len(caches)} caches")
    if not caches:
        raise ConfigError("no training cache given (--cache, or train.caches in the recipe)")
    sources = []
    for i, cache in enumerate(caches):
        reader = CacheReader(cache)
        found = [check_complete(reader, allow_partial)]
        name = vocabularies[i] if vocabularies else reader.provenance.dataset
        opened = open_views(reader, views)
        for view in opened:  # a half-extracted view cache is as incomplete as a half-extracted cache
            if view.maps is not reader:
                found.append(check_complete(view.maps, allow_partial, " with extract.views"))
        partial = [each for each in found if not each.complete]
        sources.append(TrainSource(Path(cache), reader, reader.vocabulary(name), opened, partial))
    first = sources[0]
    for other in sources[1:]:
        for model in ("sam", "clip"):
            diff = differences(getattr(first.reader.provenance, model), getattr(other.reader.provenance, model))
            if diff:
                raise CacheFormatError(
                    f"{other.cache}: extracted with another {model.upper()} than {first.cache} "
                    f"(differs in {', '.join(diff)}); all training caches need the same models"
                )
    return sources

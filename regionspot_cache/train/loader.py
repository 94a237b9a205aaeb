"""What training reads: the datasets, their orders, and the loader with its shard cache and read-ahead."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.config import TrainConfig
from regionspot_cache.errors import ConfigError
from regionspot_cache.runtime.devices import host_available_bytes
from regionspot_cache.runtime.files import remove_abandoned_temps
from regionspot_cache.train.data import CachedRegions, MultiSourceRegions, RegionBatch, TrainSource, region_loader
from regionspot_cache.train.distributed import Processes, gather_objects
from regionspot_cache.train.local_reader import open_local_sources
from regionspot_cache.train.node_share import NodeShare, node_root
from regionspot_cache.train.order import BatchPlan, EpochOrder, RankBatchSampler, epoch_order
from regionspot_cache.train.read_ahead import ReadAheadSampler, shard_directories
from regionspot_cache.train.shard_cache import ShardCache, shard_schedule

MEMORY_DIR = Path("/dev/shm")
MEMORY_SHARE = 4  # a temporary shard cache goes in memory (or /dev/shm) when it takes at most a quarter of what is free there
TEMPORARY_NAME = "rs-cache-shards"


@dataclass
class TrainingLoader:
    """This process's batches, and what feeds them: the local shard cache (``train.local_cache_dir``,
    or a cache on object storage; its ``delivered`` is the training loop's to call) and the
    read-ahead of the shards into the page cache; ``close`` stops both."""

    batches: Iterable[RegionBatch]
    shard_cache: ShardCache | None = None
    read_ahead: ReadAheadSampler | None = None

    def close(self) -> None:
        if self.read_ahead is not None:
            self.read_ahead.close()
        if self.shard_cache is not None:
            self.shard_cache.close()


def training_regions(sources: Sequence[TrainSource], config: TrainConfig) -> MultiSourceRegions:
    return MultiSourceRegions(
        [
            CachedRegions(source.reader, source.vocabulary, config.max_boxes_per_image, config.seed, i, source.views)
            for i, source in enumerate(sources)
        ]
    )


def dataset_orders(regions: MultiSourceRegions, config: TrainConfig) -> list[EpochOrder]:
    """Each dataset's epoch order (``train.order``): a function of the seed and the dataset alone."""
    return [
        epoch_order(
            config.order,
            source.shards() if config.order.by_shards else range(len(source)),
            config.seed,
            i,
            config.resident_shards,
        )
        for i, source in enumerate(regions.sources)
    ]


def training_loader(
    sources: Sequence[TrainSource], config: TrainConfig, start: int, processes: Processes, pin_memory: bool
) -> TrainingLoader:
    """This process's batches from step ``start`` on, with the shard cache they are read through
    (``shard_cache_for``) and their read-ahead (``read_ahead_for``); started here, closed by the caller."""
    regions = training_regions(sources, config)
    plan = BatchPlan(
        regions.sizes(),
        config.dataset_weights or [1.0] * len(sources),
        config.batch_size,
        config.seed,
        dataset_orders(regions, config),
    )
    sampler = RankBatchSampler(plan, start, processes.rank, processes.world_size)
    shard_cache = shard_cache_for(regions, sampler, sources, config, start, processes)
    if shard_cache is not None:
        regions = training_regions(open_local_sources(sources, shard_cache, config.views), config)
        shard_cache.start()
    # A temporary shard cache holds the coming steps' shards alone, fetched moments before they
    # are read: their pages are in memory, and reading them ahead only walked them once more
    # (without it 1.10x the loader from object storage with no workers, in one process taking
    # turns; within the spread in the benchmark's own runs: benchmarks/RESULTS.md, run 10).
    temporary = shard_cache is not None and shard_cache.temporary
    read_ahead = None if temporary else read_ahead_for(regions, sampler, config, start)
    batches = region_loader(regions, read_ahead or sampler, config.num_workers, config.prefetch_batches, pin_memory)
    return TrainingLoader(batches, shard_cache, read_ahead)


def read_ahead_for(
    regions: MultiSourceRegions, sampler: RankBatchSampler, config: TrainConfig, start: int
) -> ReadAheadSampler | None:
    """``sampler`` with its shards read ahead into the page cache (``train.read_ahead_shards``, shard
    order only: a uniform order touches most shards every step). A source read through several views
    is not read ahead: each image reads one of them, so whole shards of each would be read for a part."""
    ahead = config.resident_shards if config.read_ahead_shards is None else config.read_ahead_shards
    if not config.order.by_shards or not ahead:
        return None
    readers = [
        list(dict.fromkeys([source.views[0].maps, source.views[0].boxes])) if len(source.views) == 1 else []
        for source in regions.sources
    ]
    shards = [source.shards() for source in regions.sources]
    return ReadAheadSampler(sampler, shards, shard_directories(readers), ahead, steps=max(0, config.iterations - start))


def temporary_shard_dir(budget: int | None = None) -> Path:
    """A new private directory for a temporary shard cache: in memory (``/dev/shm``) when TMPDIR
    names no other place and ``/dev/shm`` has ``MEMORY_SHARE`` times ``budget`` bytes free (its files
    then cost no file system work: 10-20% of the loader's CPU from object storage), else in the
    temporary directory. Named after this process: what a killed run left is removed here."""
    base = None
    if budget is not None and not os.environ.get("TMPDIR") and MEMORY_DIR.is_dir():
        try:
            base = MEMORY_DIR if shutil.disk_usage(MEMORY_DIR).free >= MEMORY_SHARE * budget else None
        except OSError:
            base = None
    base = Path(base or tempfile.gettempdir())
    remove_abandoned_temps(base, re.escape(TEMPORARY_NAME), prefix="")  # another user's stays: not theirs to remove
    return Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_NAME}-{os.getpid()}-", dir=base))


def shard_cache_for(
    regions: MultiSourceRegions,
    sampler: RankBatchSampler,
    sources: Sequence[TrainSource],
    config: TrainConfig,
    start: int,
    processes: Processes,
) -> ShardCache | None:
    """The local copy this process reads its shards from, shared by the processes of its node and
    fetched ahead along their batches: under ``train.local_cache_dir/node-<first rank of the
    node>`` within ``train.local_cache_gb`` (for the node); without it, for caches on object
    storage read in shard order, in a private temporary directory holding the shards of a step
    and ``CacheReader.remote_shards_kept`` more. Fetched once for the node, by its first process,
    for all the loader workers, ahead of their reads (each worker fetching the shard it touches,
    when it touches it, kept the loader at about half the store's throughput). None: read the
    caches as they are. Every process must call this (it gathers the node's directory)."""
    on_store = config.order.by_shards and all(CacheLocation.parse(source.cache).remote for source in sources)
    if config.local_cache_dir is None and not on_store:
        return None
    shards = [source.shards() for source in regions.sources]
    node = NodeShare.of(processes)
    steps = itertools.islice(sampler.shares(node.ranks), config.iterations - start)
    temporary = config.local_cache_dir is None

    def node_cache(root: Path) -> ShardCache:
        budget = int(config.local_cache_gb * 1e9)
        schedule = shard_schedule(steps, shards, start)
        return ShardCache([s.cache for s in sources], root, budget, schedule, temporary=temporary, node=node)

    def sizes(cache: ShardCache) -> tuple[int, int]:
        """(the largest shard's bytes, how many shards one step of the node reads at most)."""
        largest = max(cache.shard_bytes((i, int(s))) for i, per_source in enumerate(shards) for s in np.unique(per_source))
        return largest, min(2 * config.resident_shards, sampler.per_rank * node.size)

    cache, root = None, None
    if node.fetches:  # makes the node's directory (emptied) before the others open it
        if temporary:
            cache = node_cache(temporary_shard_dir())
            largest, step_shards = sizes(cache)
            cache.relocate(temporary_shard_dir((step_shards + CacheReader.remote_shards_kept) * largest))
            root = cache.local_root
        else:
            root = Path(config.local_cache_dir) / f"node-{node.first}"
            try:
                cache = node_cache(root)
            except OSError as err:  # a file in its place, no permission, a read-only disk
                raise ConfigError(f"train.local_cache_dir: cannot make {root}: {err.strerror or err}") from None
    shared = node_root(gather_objects((node, None if root is None else str(root)), processes), node)
    if cache is None:
        cache = node_cache(shared)
    largest, step_shards = sizes(cache)
    if temporary:
        cache.budget = (step_shards + CacheReader.remote_shards_kept) * largest
        # One process reading (no loader workers, none beside it on the node) keeps the shards in
        # its memory when they fit: not written to files and read back (1.51x the loader's rate
        # from object storage, side by side: benchmarks/RESULTS.md, run 13).
        alone = config.num_workers == 0  # any other count keeps at least one worker (fitted_workers)
        cache.hold_in_memory(alone and host_available_bytes() >= MEMORY_SHARE * cache.budget)
    cache.check_room(step_shards * largest)
    return cache

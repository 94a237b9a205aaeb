"""Shards as dask tasks: a local multi-process cluster by default, or an existing one.

Each task extracts one shard and commits it; a shard has exactly one writer because each is one
task, and a retried task starts the shard afresh. The encoders are loaded once per worker
process. A shard that still fails after its retries is reported and the others go on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dask
from distributed import Client, LocalCluster, as_completed, get_worker

from regionspot_cache.cache import CacheWriter, Provenance, exclusive_extraction
from regionspot_cache.config import ExtractConfig, ModelsConfig
from regionspot_cache.data.datasets import DetectionDataset, ImageEntry
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders
from regionspot_cache.extract.runner import (
    ExtractProgress,
    ExtractSummary,
    ShardResult,
    extract_shard,
    prepare_cache,
    shard_dataset,
    shard_entries,
)
from regionspot_cache.runtime import resolve_device

_WORKER_ENCODERS: dict[str, FrozenEncoders] = {}


def _worker_device(config: ExtractConfig):
    """``auto`` on a worker of a local GPU cluster: one GPU per worker, by worker number."""
    import torch

    if config.device != "auto" or not torch.cuda.is_available():
        return resolve_device(config.device)
    name = str(get_worker().name)
    index = int(name) if name.isdigit() else 0
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


def extract_shard_task(
    shard_id: int, entries: list[ImageEntry], dataset: DetectionDataset, cache_dir: str,
    models: ModelsConfig, config: ExtractConfig, provenance: Provenance,
) -> ShardResult:
    device = _worker_device(config)
    key = f"{models!r}@{device}"
    if key not in _WORKER_ENCODERS:
        _WORKER_ENCODERS[key] = load_frozen_encoders(models, device)
    writer = CacheWriter(cache_dir, provenance)  # refuses a cache of another identity
    if shard_id in writer.committed_shards():  # committed by an earlier attempt
        return ShardResult(shard_id)
    return extract_shard(shard_id, entries, dataset, _WORKER_ENCODERS[key], writer, config)


def local_cluster(workers: int) -> LocalCluster:
    # Worker processes must not be daemonic, or DataLoader workers cannot start inside them.
    environ = dict(os.environ)
    try:
        with dask.config.set({"distributed.worker.daemon": False}):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    finally:
        # Starting workers sets OMP_NUM_THREADS=1 and the like in this process too; put back
        # the caller's environment (it changes the thread count of later subprocesses).
        os.environ.clear()
        os.environ.update(environ)


def default_workers() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def run_distributed(
    dataset: DetectionDataset,
    cache_dir: Path | str,
    models: ModelsConfig,
    config: ExtractConfig,
    box_source: str = "gt",
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    encoders: FrozenEncoders | None = None,
) -> ExtractSummary:
    """Extract every missing shard as a dask task on ``scheduler`` (an address) or a local cluster."""
    with exclusive_extraction(cache_dir):
        return _run_distributed(dataset, cache_dir, models, config, box_source, scheduler, workers, retries, encoders)


def _run_distributed(dataset: DetectionDataset, cache_dir: Path | str, models: ModelsConfig, config: ExtractConfig,
                     box_source: str, scheduler: str | None, workers: int | None, retries: int,
                     encoders: FrozenEncoders | None) -> ExtractSummary:
    started = time.perf_counter()
    encoders = encoders or load_frozen_encoders(models, resolve_device("cpu"))  # provenance + vocabulary
    writer = prepare_cache(dataset, cache_dir, encoders, config, box_source)
    committed = writer.committed_shards()
    shards = [(i, entries) for i, entries in shard_entries(dataset.images, config.shard_size) if i not in committed]
    summary = ExtractSummary(shards_skipped=len(committed))
    cluster = None if scheduler else local_cluster(workers or default_workers())
    with Client(scheduler or cluster) as client, ExtractProgress(dataset.name, sum(len(e) for _, e in shards)) as progress:
        futures = {
            client.submit(
                extract_shard_task, shard_id, entries, shard_dataset(dataset, entries), str(cache_dir), models,
                config, writer.provenance, retries=retries, key=f"rs-cache-shard-{shard_id}-{started}",
            ): (shard_id, entries)
            for shard_id, entries in shards
        }
        for future in as_completed(futures):
            shard_id, entries = futures[future]
            try:
                result = future.result()
            except Exception as err:  # a shard that failed all its tries is reported, not fatal
                summary.failed_shards[shard_id] = f"{type(err).__name__}: {err}"
                continue
            summary.add(result)
            progress.advance(result.images, result.boxes)
    if cluster is not None:
        cluster.close()
    summary.seconds = time.perf_counter() - started
    return summary

"""Distributors: where ``run_extraction``'s pending shards are encoded.

``InProcess()`` runs them in the calling process. ``Dask(scheduler, workers, retries)`` runs each
shard as a dask task, on a local multi-process cluster by default or on an existing one; a shard
has exactly one writer because each is one task, and a retried task starts the shard afresh. A
shard that still fails after its retries is reported and the others go on. Both call the same
worker function, ``worker.extract_shards``.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import dask
import torch
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from distributed.utils import get_mp_context

from regionspot_cache.cache import CacheWriter, Provenance
from regionspot_cache.config import ExtractConfig, ModelsConfig
from regionspot_cache.data.datasets import DetectionDataset, ImageEntry
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders
from regionspot_cache.errors import InputError
from regionspot_cache.extract.plan import Shard, shard_dataset
from regionspot_cache.extract.worker import OnBatch, ShardResult, extract_shards
from regionspot_cache.runtime.devices import resolve_device, unix_sockets_fit


@dataclass
class ExtractionWork:
    """What every shard of one extraction shares; sent whole to remote workers."""

    dataset: DetectionDataset
    cache_dir: Path
    models: ModelsConfig
    config: ExtractConfig
    provenance: Provenance


@dataclass
class ShardOutcome:
    shard_id: int
    result: ShardResult | None = None  # None: the shard failed
    error: str = ""


class Distributor(Protocol):
    def setup_device(self, config: ExtractConfig) -> torch.device:
        """Where the runner loads the encoders it uses for the cache's identity and vocabulary."""

    def run(
        self, work: ExtractionWork, shards: Sequence[Shard], encoders: FrozenEncoders, writer: CacheWriter, on_batch: OnBatch
    ) -> Iterator[ShardOutcome]:
        """Encode and commit ``shards``, yielding each one's outcome as it finishes (``encoders``
        come with ``work.config.preprocess`` applied)."""


@dataclass
class InProcess:
    """Every shard in this process, with the encoders the runner loaded. Errors propagate."""

    def setup_device(self, config: ExtractConfig) -> torch.device:
        return resolve_device(config.device)

    def run(
        self, work: ExtractionWork, shards: Sequence[Shard], encoders: FrozenEncoders, writer: CacheWriter, on_batch: OnBatch
    ) -> Iterator[ShardOutcome]:
        for result in extract_shards(shards, work.dataset, encoders, writer, work.config, on_batch):
            yield ShardOutcome(result.shard_id, result)


@dataclass
class Dask:
    """Each shard a dask task on ``scheduler`` (an address such as ``tcp://host:8786``) or, when it
    is None, on a local cluster of ``workers`` processes (default: one per GPU, else one)."""

    scheduler: str | None = None
    workers: int | None = None
    retries: int = 2

    def __post_init__(self) -> None:
        # A local cluster of -1 workers waits forever for workers that never come.
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers {self.workers}: must be at least 1")
        if self.retries < 0:
            raise InputError(f"--retries {self.retries}: must be at least 0")

    def setup_device(self, config: ExtractConfig) -> torch.device:
        return torch.device("cpu")  # identity and vocabulary only; the workers load their own encoders

    def run(
        self, work: ExtractionWork, shards: Sequence[Shard], encoders: FrozenEncoders, writer: CacheWriter, on_batch: OnBatch
    ) -> Iterator[ShardOutcome]:
        run_id = time.time_ns()
        with dask_client(self.scheduler, self.workers) as client:
            futures = {
                client.submit(
                    extract_shard_task,
                    shard_id,
                    entries,
                    _task_work(work, entries),
                    retries=self.retries,
                    key=f"rs-cache-shard-{shard_id}-{run_id}",
                ): shard_id
                for shard_id, entries in shards
            }
            for future in as_completed(futures):
                shard_id = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # a shard that failed all its tries is reported, not fatal
                    yield ShardOutcome(shard_id, error=f"{type(err).__name__}: {err}")
                    continue
                on_batch(result.images, result.boxes)
                yield ShardOutcome(shard_id, result)


@contextmanager
def dask_client(scheduler: str | None, workers: int | None) -> Iterator[Client]:
    """A client of ``scheduler``, or of a local cluster of ``workers`` processes (default: one per
    GPU, else one) that is closed however the run ends. Shared with ``propose.distribute``."""
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with local_cluster(workers or default_workers()) as cluster, Client(cluster) as client:
        yield client


def _task_work(work: ExtractionWork, entries: list[ImageEntry]) -> ExtractionWork:
    """Only the part of the dataset the shard needs travels with its task."""
    return ExtractionWork(shard_dataset(work.dataset, entries), work.cache_dir, work.models, work.config, work.provenance)


_WORKER_ENCODERS: dict[str, FrozenEncoders] = {}  # loaded once per worker process


def extract_shard_task(shard_id: int, entries: list[ImageEntry], work: ExtractionWork) -> ShardResult:
    """One shard on a dask worker (module-level, so the task pickles by reference)."""
    device = worker_device(work.config.device)
    key = f"{work.models!r}@{device}/{work.config.preprocess}"
    if key not in _WORKER_ENCODERS:
        _WORKER_ENCODERS[key] = load_frozen_encoders(work.models, device, work.config.preprocess)
    writer = CacheWriter(work.cache_dir, work.provenance)  # refuses a cache of another identity
    if shard_id in writer.committed_shards():  # committed by an earlier attempt
        return ShardResult(shard_id=shard_id)
    return next(extract_shards([(shard_id, entries)], work.dataset, _WORKER_ENCODERS[key], writer, work.config))


def worker_device(name: str) -> torch.device:
    """``auto`` on a worker of a local GPU cluster: one GPU per worker, by worker number."""
    if name != "auto" or not torch.cuda.is_available():
        return resolve_device(name)
    worker = str(get_worker().name)
    index = int(worker) if worker.isdigit() else 0
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


# What the local cluster's fork server imports once, so that its workers start with it loaded.
WORKER_PRELOAD = ["distributed", __name__]


@contextmanager
def local_cluster(workers: int) -> Iterator[LocalCluster]:
    """A cluster of ``workers`` processes on this machine, closed on exit. Its workers are forked
    from a server process that has imported this module (multiprocessing's forkserver, started by
    the first local cluster of the process): spawned instead, each worker imported torch, open_clip
    and segment-anything on its own, 5 s or more per worker and per cluster, where a forked one
    starts in about 0.1 s. They run in the caller's environment as it is now (``CallerEnvironment``),
    as spawned workers would, not in the one the server started with (though what a library read
    when the server imported it came from the server's: in the CLI, the caller's)."""
    environ = dict(os.environ)
    # Held while the cluster lives: a worker its nanny restarts is made the same way. Not daemonic,
    # or DataLoader workers cannot start inside them.
    method = worker_start_method()
    with dask.config.set({"distributed.worker.daemon": False, "distributed.worker.multiprocessing-method": method}):
        if method == "forkserver":
            get_mp_context().set_forkserver_preload(WORKER_PRELOAD)  # once the server runs, this changes nothing
        try:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                plugins=(CallerEnvironment(environ, nanny_settings()),),
            )
        finally:
            # Starting workers sets OMP_NUM_THREADS=1 and the like in this process too; put back
            # the caller's environment (it changes the thread count of later subprocesses).
            os.environ.clear()
            os.environ.update(environ)
        try:
            yield cluster
        finally:
            close_quietly(cluster)


def worker_start_method() -> str:
    """``forkserver``; ``spawn`` where the server's Unix socket cannot be made (a TMPDIR too long
    for one, before Python 3.13): slower to start, but the workers run."""
    return "forkserver" if unix_sockets_fit() else "spawn"


def nanny_settings() -> set[str]:
    """The variables dask's nanny sets for its workers (OMP_NUM_THREADS and the like)."""
    return {*dask.config.get("distributed.nanny.pre-spawn-environ"), *dask.config.get("distributed.nanny.environ")}


class CallerEnvironment(WorkerPlugin):
    """Makes a local worker's environment the caller's (``environ``) with the nanny's settings on
    top. A worker forked from the fork server inherits the server's environment, taken when the
    process started its first local cluster: without this, a variable set or removed since (a
    credential, an endpoint) would be missing or still there."""

    def __init__(self, environ: dict[str, str], keep: set[str]):
        self.environ, self.keep = environ, keep

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed's Worker
        for name in [name for name in os.environ if name not in self.environ and name not in self.keep]:
            del os.environ[name]
        os.environ.update({name: value for name, value in self.environ.items() if name not in self.keep})


class _KillAtTeardown(logging.Filter):
    """Drops distributed's "Worker process still alive after 4.0 seconds, killing": a worker that
    has loaded torch often takes longer than the nanny's 4 s to exit, but by then every shard is
    committed and nothing is lost by the kill, so the warning only alarms on a successful run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "still alive after" not in record.getMessage()


def close_quietly(cluster: LocalCluster) -> None:
    """Close the local cluster without the warning about workers killed at teardown."""
    nanny_log, quiet = logging.getLogger("distributed.nanny"), _KillAtTeardown()
    nanny_log.addFilter(quiet)
    try:
        cluster.close()
    finally:
        nanny_log.removeFilter(quiet)


def default_workers() -> int:
    return max(1, torch.cuda.device_count())

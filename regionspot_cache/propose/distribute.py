"""Distributors of ``propose``'s shards: in this process, or as dask tasks.

Both call ``worker.propose_shard``. ``Dask`` uses extraction's local cluster, client and device choice
(``extract.distribute.dask_client`` and ``worker_device``): each shard is one task, so it has one writer; a retried task
writes its shard file afresh, and a shard that fails all its tries is reported while the others
go on. Extraction's ``Distributor`` protocol takes a cache writer and encoders, so this is its
sibling with the same two engines rather than a generalisation of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

from regionspot_cache.propose.detectors import Detector, load_detector
from regionspot_cache.propose.worker import ProposeWork, Shard, ShardOutcome, propose_shard
from regionspot_cache.propose.writer import ProposalWriter

LoadDetector = Callable[[], Detector]


class Distributor(Protocol):
    def run(
        self, work: ProposeWork, shards: Sequence[Shard], load: LoadDetector, writer: ProposalWriter
    ) -> Iterator[ShardOutcome]:
        """Write the shard file of each of ``shards``, yielding each one's outcome as it finishes."""


@dataclass
class InProcess:
    """Every shard here, with one detector loaded on first use. Errors propagate."""

    def run(
        self, work: ProposeWork, shards: Sequence[Shard], load: LoadDetector, writer: ProposalWriter
    ) -> Iterator[ShardOutcome]:
        detector = None
        for shard_id, entries in shards:
            detector = detector or load()
            yield propose_shard(shard_id, entries, work, detector, writer)


@dataclass
class Dask:
    """Each shard a dask task on ``scheduler`` or on a local cluster of ``workers`` processes."""

    scheduler: str | None = None
    workers: int | None = None
    retries: int = 2

    def run(
        self, work: ProposeWork, shards: Sequence[Shard], load: LoadDetector, writer: ProposalWriter
    ) -> Iterator[ShardOutcome]:
        from distributed import as_completed

        from regionspot_cache.extract.distribute import dask_client

        run_id = time.time_ns()
        with dask_client(self.scheduler, self.workers) as client:
            futures = {
                client.submit(
                    propose_shard_task, shard_id, entries, work, retries=self.retries, key=f"rs-cache-propose-{shard_id}-{run_id}"
                ): shard_id
                for shard_id, entries in shards
            }
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as err:  # a shard that failed all its tries is reported, not fatal
                    yield ShardOutcome(futures[future], error=f"{type(err).__name__}: {err}")


_WORKER_DETECTORS: dict[str, Detector] = {}  # loaded once per worker process


def propose_shard_task(shard_id: int, entries: list, work: ProposeWork) -> ShardOutcome:
    """One shard on a dask worker (module-level, so the task pickles by reference)."""
    from regionspot_cache.extract.distribute import worker_device

    device = worker_device(work.device)
    key = f"{work.model_dir}@{device}"
    if key not in _WORKER_DETECTORS:
        _WORKER_DETECTORS[key] = load_detector(work.model_dir, device)
    writer = ProposalWriter(work.output, work.provenance)
    if shard_id in writer.committed_shards():  # written by an earlier attempt
        return ShardOutcome(shard_id, len(entries))
    return propose_shard(shard_id, entries, work, _WORKER_DETECTORS[key], writer)

"""A local copy of the shards training is about to read, within a byte budget (``train.local_cache_dir``).

For a cache larger than the node's disk and memory (read from a shared filesystem or object
storage): a background thread walks the shards the coming steps read (the batch plan is a pure
function of the step, so the walk is known in advance), fetches each whole shard into the local
directory before its first read, and evicts the least recently needed shard that no batch still
to be delivered needs, whenever the next fetch would overflow the budget. From object storage a
shard is fetched by its GETs alone: its objects come from the one listing taken for the budget. Readers
(``local_reader.LocalShardReader``, in the loader workers too) wait for a shard's directory to
appear; a fetch lands by one rename, so a directory that exists is complete. A process reading
alone (no loader workers, no other process on the node) may keep the shards in its memory
instead (``hold_in_memory``): nothing is written to a file and read back.

With ``train.order = "shards"`` every shard is needed during one window per epoch, so an epoch
fetches each shard once (plus the few that straddle the budget at epoch boundaries).

With several processes on a node (DDP), they share one directory: the first fetches and evicts
along the node's schedule, the others only read and publish their progress (``node_share.py``).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from regionspot_cache.cache.format import SHARDS_DIR, shard_name
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.errors import CacheFormatError, ConfigError
from regionspot_cache.train.node_share import NodeProgress, NodeShare, leave_node

log = logging.getLogger(__name__)

FAILED_FILE = "FAILED"  # written by the fetching thread when it stops on an error; readers raise it
FETCHING_SUFFIX = ".fetching"
WAIT_POLL_S = 0.002
WAIT_LIMIT_S = 1800.0
FETCH_THREADS = 8  # shards fetched at once (the budget permitting)
PROGRESS_POLL_S = 0.005  # a fetch waiting for room re-reads the other processes' progress this often

ShardKey = tuple[int, int]  # (source, shard)
Fetcher = Callable[[Path, int, Path], int]


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist). Files that vanish meanwhile (a
    shard landing by rename, or evicted, while another is fetched) are not counted."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for directory, _, files in os.walk(path):  # os.walk skips directories that vanish
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass
    return total


def fetch_shard(source_cache: Path | str, shard_id: int, local_dir: Path | str, objects: dict[str, int] | None = None) -> int:
    """Copy committed shard ``shard_id`` of the cache at ``source_cache`` to
    ``local_dir/shards/<name>``, landing by one rename; returns the bytes copied.

    The one place a shard is fetched: from a cache on object storage, the storage layer's own
    fetch (GETs of the committed shard's objects, landing by one rename too; ``objects``, the
    shard's objects from ``CacheLocation.shard_objects``, spares a lookup and a listing)."""
    final = Path(local_dir) / SHARDS_DIR / shard_name(shard_id)
    location = CacheLocation.parse(source_cache)
    if location.remote:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tree_bytes(location.fetch_shard(shard_id, final.parent, objects))
        except FileNotFoundError as err:
            raise CacheFormatError(f"{err}; cannot fetch it into {final.parent}") from None
    source = Path(source_cache) / SHARDS_DIR / shard_name(shard_id)
    staging = final.with_name(final.name + FETCHING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source, staging)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CacheFormatError(f"{source}: cannot fetch the shard into {final.parent}: {err}") from None
    os.rename(staging, final)
    return tree_bytes(final)


@dataclass
class ShardCacheStats:
    fetched_bytes: int = 0
    fetches: int = 0
    evictions: int = 0
    # the local directory's size after each fetch: the landed shards' bytes as measured on disk
    # when each landed, and the full size of those still in flight (a walk of the directory after
    # every fetch cost a third of a millisecond per MB, in the thread the fetches need)
    peak_disk_bytes: int = 0
    wait_seconds: float = 0.0  # the fetching thread's time waiting for room (it is ahead of the readers)


def shard_schedule(
    batches: Iterable[Sequence[tuple[int, int, int]]], shards: Sequence[np.ndarray], start: int
) -> Iterator[tuple[int, list[ShardKey]]]:
    """(step, the (source, shard) pairs the step's keys read) for each batch of ``batches``
    (keys ``(source, epoch, index)``, as ``RankBatchSampler`` yields them), counting from ``start``."""
    for step, keys in enumerate(batches, start):
        yield step, list(dict.fromkeys((source, int(shards[source][index])) for source, _, index in keys))


class ShardCache:
    """Fetches the shards of ``schedule`` ahead into ``local_root/<source>/``, at most ``budget``
    bytes there; ``delivered(step)`` tells it which batches are read (their shards may go).

    After ``hold_in_memory(True)`` (one process reading, no loader workers: its readers are
    ``LocalShardReader.of(..., memory=cache)``), the fetched shards' files stay in this process's
    memory instead of landing in ``local_root``: no copy written to a file and read back.

    Arguments:
      caches: the training caches, by source.
      local_root: the node's local directory (emptied first by the node's fetching process: what a
        killed run left, shards, staging and progress alike, is not trusted).
      budget: bytes allowed on disk under ``local_root``, for the whole node.
      schedule: ``shard_schedule`` of the node's batches (``RankBatchSampler.shares`` of its
        processes) from the first step on; only the fetching process walks it.
      fetch: ``fetch_shard`` or another with its contract; by default ``fetch_shard`` with the
        objects the listing of ``shard_bytes`` found (on object storage: GETs alone).
      temporary: remove ``local_root`` on ``close`` (a cache on object storage read without
        ``train.local_cache_dir``): the last process of the node to close removes it.
      node: the processes sharing ``local_root``; with more than one, the one that does not fetch
        is built after the fetching one (which makes the directory and its progress file).

    Why a node cannot deadlock: only the fetching process fetches, walking the node's steps in
    order, and it evicts a shard once every process has delivered the last step seen so far to
    need it. While it waits for room at step t, every shard of a step before t is on disk or on
    its way (one evicted had its last need at or before every process's delivered step), so every
    process can deliver up to t - 1; then every shard but those of step t may go, and one step's
    shards fit the budget (``check_room``). Each process's progress depends on its own reads alone.
    """

    def __init__(
        self,
        caches: Sequence[Path],
        local_root: Path,
        budget: int,
        schedule: Iterator[tuple[int, list[ShardKey]]],
        fetch: Fetcher | None = None,
        temporary: bool = False,
        node: NodeShare = NodeShare(),
    ):
        self.caches, self.local_root, self.budget = [Path(c) for c in caches], Path(local_root), budget
        self.temporary, self.node = temporary, node  # removed on close; the processes sharing it
        self.schedule, self._fetch_given = schedule, fetch
        self.hold_in_memory(False)
        self._files: dict[tuple[str, int], dict[str, Any]] = {}  # in memory: (local_dir, shard) -> its files
        self.stats = ShardCacheStats()
        self._present: OrderedDict[ShardKey, int] = OrderedDict()  # bytes, least recently needed first
        self._last_needed: dict[ShardKey, int] = {}
        self._delivered = -1
        self._stopping = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._sizes: dict[ShardKey, int] = {}
        self._objects: dict[tuple[str, int], dict[str, int]] = {}  # (cache, shard): its objects, on object storage
        self._reserved: dict[ShardKey, int] = {}  # being fetched: bytes they will take
        self._progress: NodeProgress | None = None
        self._make_root()
        self._thread = threading.Thread(target=self._run, name="shard-fetcher", daemon=True)

    def _make_root(self) -> None:
        if self.node.fetches:
            shutil.rmtree(self.local_root, ignore_errors=True)
            self.local_root.mkdir(parents=True, mode=0o700 if self.temporary else 0o777)
        self._progress = NodeProgress(self.local_root, self.node) if self.node.size > 1 else None

    def relocate(self, local_root: Path) -> None:
        """Use ``local_root`` instead, before ``start`` and before the node's other processes open
        it: the loader places a temporary directory once the listing has given the shards' sizes."""
        shutil.rmtree(self.local_root, ignore_errors=True)
        self.local_root = Path(local_root)
        self._make_root()

    def hold_in_memory(self, enabled: bool) -> None:
        """Keep the fetched shards in memory (one process of the node alone), or land them in
        files; before ``start`` and before any reader opens this cache."""
        self.in_memory = enabled and self.node.size == 1
        self.fetch = self._fetch_given or (self._fetch_into_memory if self.in_memory else self._fetch_listed)

    def local_dir(self, source: int) -> Path:
        return self.local_root / str(source)

    def check_room(self, largest_step: int) -> None:
        """Refuse a budget that cannot hold the shards of one step (the fetcher would wait forever)."""
        if largest_step > self.budget:
            raise ConfigError(
                f"train.local_cache_gb: {self.budget / 1e9:.3g} GB cannot hold the shards one step reads "
                f"({largest_step / 1e9:.3g} GB: up to twice train.resident_shards of the largest); raise it"
            )

    def shard_bytes(self, key: ShardKey) -> int:
        if key not in self._sizes:
            location = CacheLocation.parse(self.caches[key[0]])
            if location.remote:  # every shard's objects and size from one listing
                listed = location.shard_objects()
                self._objects.update({(str(self.caches[key[0]]), shard): objects for shard, objects in listed.items()})
                self._sizes.update({(key[0], shard): sum(objects.values()) for shard, objects in listed.items()})
            else:
                self._sizes[key] = tree_bytes(location.local / SHARDS_DIR / shard_name(key[1]))
        return self._sizes.get(key, 0)

    def start(self) -> "ShardCache":
        if self.node.fetches:
            self._thread.start()
        return self

    def delivered(self, step: int) -> None:
        """Every batch up to ``step`` is read: shards no later batch needs may be evicted."""
        if self._progress is not None:
            self._progress.delivered(step)
        with self._changed:
            self._delivered = step
            self._changed.notify_all()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop fetching (and remove a temporary directory once the node's last process closes).
        The fetching process closes after the others' last reads: in training, DDP's last step
        waits for every process, which has read its last batch by then."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        with self._changed:
            self._files.clear()
        if self.temporary and self._progress is not None:
            leave_node(self.local_root, self.node)
        elif self.temporary:
            shutil.rmtree(self.local_root, ignore_errors=True)

    def _node_delivered(self) -> int:
        """The last step every process of the node has delivered."""
        return self._delivered if self._progress is None else min(self._delivered, self._progress.least())

    def _run(self) -> None:
        # Up to FETCH_THREADS shards in flight, the next one started as soon as any has landed:
        # one shard's few objects leave most of a link idle, and a step of shard order reads
        # several shards at once.
        in_flight: set[Future] = set()
        try:
            with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="shard-fetch") as pool:
                for step, keys in self.schedule:
                    with self._changed:  # all of a step's shards first: none is evicted to make room for another
                        self._last_needed.update(dict.fromkeys(keys, step))
                    for key in keys:
                        size = self._make_room(key)
                        if size is None:
                            return
                        if size:
                            in_flight.add(pool.submit(self._fetch, key, size))
                        in_flight = _landed(in_flight, FETCH_THREADS - 1)
                _landed(in_flight, 0)
        except BaseException as err:  # noqa: BLE001 - handed to the training loop and to the readers
            with self._changed:
                self._error = err
                self._changed.notify_all()
            (self.local_root / FAILED_FILE).write_text(f"{type(err).__name__}: {err}")
            log.error("local shard cache stopped: %s", err)

    def _make_room(self, key: ShardKey) -> int | None:
        """Reserve room for ``key`` (evicting shards no coming batch needs): its bytes, 0 when it
        is there or on its way already, None when closing."""
        with self._changed:
            if key in self._present:
                self._present.move_to_end(key)
                return 0
            if key in self._reserved:
                return 0
            size = max(self.shard_bytes(key), 1)
            waited = time.perf_counter()
            while sum(self._present.values()) + sum(self._reserved.values()) + size > self.budget:
                if self._stopping:
                    return None
                delivered = self._node_delivered()
                victim = next((k for k in self._present if self._last_needed[k] <= delivered), None)
                if victim is None:  # the other processes' progress is seen by polling it
                    self._changed.wait(timeout=1.0 if self._progress is None else PROGRESS_POLL_S)
                    continue
                if self.in_memory:
                    del self._files[(str(self.local_dir(victim[0])), victim[1])]
                else:
                    shutil.rmtree(self.local_dir(victim[0]) / SHARDS_DIR / shard_name(victim[1]))
                del self._present[victim]
                self.stats.evictions += 1
            self.stats.wait_seconds += time.perf_counter() - waited
            if self._stopping:
                return None
            self._reserved[key] = size
            return size

    def _fetch_listed(self, cache: Path, shard: int, local_dir: Path) -> int:
        return fetch_shard(cache, shard, local_dir, self._objects.get((str(cache), shard)))

    def _fetch_into_memory(self, cache: Path, shard: int, local_dir: Path) -> int:
        """``fetch``'s contract with the files kept in ``_files`` under ``local_dir``'s name."""
        try:
            files = CacheLocation.parse(cache).shard_in_memory(shard, self._objects.get((str(cache), shard)))
        except FileNotFoundError as err:
            raise CacheFormatError(f"{err}; cannot fetch it into memory") from None
        with self._changed:
            self._files[(str(local_dir), shard)] = files
            self._changed.notify_all()
        return sum(memoryview(data).nbytes for data in files.values())

    def present_files(self, local_dir: Path, shard: int) -> dict[str, Any] | None:
        """The files of a shard in memory, None when it is not (yet, or any more)."""
        with self._changed:
            return self._files.get((str(local_dir), shard))

    def files_of(self, local_dir: Path, shard: int) -> dict[str, Any]:
        """The files of a shard fetched into memory, once it is there (``in_memory``)."""
        key = (str(local_dir), shard)
        with self._changed:
            waited = time.perf_counter()
            while key not in self._files:
                if self._error is not None:
                    raise CacheFormatError(f"shard {shard} of {local_dir}: never fetched: {self._error}")
                if time.perf_counter() - waited > WAIT_LIMIT_S:
                    raise CacheFormatError(f"shard {shard} of {local_dir}: not fetched after {WAIT_LIMIT_S:.0f} s")
                self._changed.wait(timeout=1.0)
            return self._files[key]

    def _fetch(self, key: ShardKey, size: int) -> None:
        fetched = self.fetch(self.caches[key[0]], key[1], self.local_dir(key[0]))
        with self._changed:
            del self._reserved[key]
            self._present[key] = fetched
            self.stats.fetched_bytes += fetched
            self.stats.fetches += 1
            on_disk = sum(self._present.values()) + sum(self._reserved.values())
            self.stats.peak_disk_bytes = max(self.stats.peak_disk_bytes, on_disk)
            self._changed.notify_all()  # a shard smaller than reserved frees room for a waiting fetch


def _landed(in_flight: set[Future], most: int) -> set[Future]:
    """Wait until at most ``most`` fetches are in flight (raising a failed one's error); those left."""
    while in_flight:
        done, pending = wait(in_flight, timeout=0 if len(in_flight) <= most else None, return_when=FIRST_COMPLETED)
        for future in done:
            future.result()
        in_flight = pending
        if len(in_flight) <= most:
            break
    return in_flight

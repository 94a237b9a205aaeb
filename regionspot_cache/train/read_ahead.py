"""The shards the coming batches read, read into the page cache ahead of the loader (``train.read_ahead_shards``).

A loader reading a cold local cache in shard order is otherwise one process whose CPU work per
byte (the copy out of the memory map, the crc32c check, per-image bookkeeping) does not overlap
its I/O: the disk idles while a batch is assembled, and the read reached 0.60 of the disk's
sequential bandwidth (``benchmarks/RESULTS.md``). A background thread of the training process
walks its own copy of the batch plan (a pure function of the step) and reads the feature files
of each shard whole, in large sequential reads that copy nothing into the process where the
system allows it (``PageSink``; the GIL is released during each read), before the loader's memory
maps touch them. The page cache is the machine's, so loader workers find the pages too.

It only reads: the batches, their order and resume are untouched. It stays at most ``ahead``
shards beyond the ones the batches handed out so far read (by default ``resident_shards``: the
next window), so what it adds to the page cache is a few shards (clean pages the kernel may
drop). Errors are the loader's to report: a file that cannot be read here is skipped, and the
loader's own read raises the clear error.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.format import FEATURES_DIR, SHARDS_DIR, shard_name
from regionspot_cache.train.local_reader import LocalShardReader
from regionspot_cache.train.order import Key, RankBatchSampler
from regionspot_cache.train.shard_cache import ShardKey, shard_schedule

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20  # one read: large enough for the kernel to read at the disk's sequential rate
ARRIVAL_POLL_S = 0.01  # waiting for a shard the local shard cache has not fetched yet
RECENT_SHARDS = 64  # shards read lately, not read again while the order still needs them
STEPS_AHEAD = 64  # the walk's least lead over the loader in steps (ReadAheadSampler: two windows' worth)


@dataclass(frozen=True)
class ShardDir:
    """A directory of a shard's files to read ahead."""

    path: Path
    fetched: bool = False  # by the local shard cache: it may not have landed yet (waited for)


# The directories to read for a (source, shard); empty: nothing to read ahead for it.
ShardDirs = Callable[[ShardKey], Sequence[ShardDir]]


@dataclass
class ReadAheadStats:
    shards: int = 0
    bytes: int = 0
    skipped_files: int = 0  # unreadable here (the loader reports them)
    waits: int = 0  # times it was ``ahead`` shards ahead and waited for the loader (it was not the bottleneck)
    reading_seconds: float = 0.0  # time spent reading (the disk busy for the loader)
    step_waits: int = 0  # times it was ``steps_ahead`` steps ahead and waited


class ShardReadAhead:
    """Reads the feature files of the shards of ``schedule`` in order of first use, at most
    ``ahead`` shards beyond the step ``reached`` last (started by ``start``, stopped by ``close``).

    Arguments:
      schedule: ``shard_schedule`` of this process's batches, from the loader's first step on.
      directories: where each (source, shard)'s files are (``shard_directories``).
      ahead: shards read beyond those of the steps reached (at least 1).
      steps_ahead: steps the walk may lead the loader by (default ``STEPS_AHEAD``): steps whose
        shards were read lately read nothing, and walking them costs the loader's CPU.
    """

    def __init__(
        self,
        schedule: Iterator[tuple[int, list[ShardKey]]],
        directories: ShardDirs,
        ahead: int,
        block_bytes: int = BLOCK_BYTES,
        steps_ahead: int | None = None,
    ):
        if ahead < 1:
            raise ValueError(f"ahead must be at least 1, not {ahead}")
        self.schedule, self.directories, self.ahead, self.block_bytes = schedule, directories, ahead, block_bytes
        self.steps_ahead = max(STEPS_AHEAD, steps_ahead or 0)
        self.stats = ReadAheadStats()
        self._reached = -1
        self._stopping = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="shard-read-ahead", daemon=True)

    def start(self) -> "ShardReadAhead":
        self._thread.start()
        return self

    def reached(self, step: int) -> None:
        """The loader is handed the batch of ``step``: shards up to ``ahead`` beyond its may be read."""
        with self._changed:
            self._reached = step
            self._changed.notify_all()

    def close(self) -> None:
        """Stop (within one block's read) and wait for the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        try:
            with PageSink() as sink:
                self._walk(sink)
        except Exception as err:  # noqa: BLE001 - only a hint to the kernel: the loader goes on without it
            log.warning("shard read-ahead stopped: %s: %s", type(err).__name__, err)

    def _walk(self, sink: "PageSink") -> None:
        recent: OrderedDict[ShardKey, None] = OrderedDict()  # not read again while the order needs them
        pending: deque[int] = deque()  # first steps of the shards read, for the bound
        for step, keys in self.schedule:
            if not self._wait_for_step(step):
                return
            for key in keys:
                if key in recent:
                    recent.move_to_end(key)
                    continue
                if not self._wait_for_room(step, pending) or not self._read_shard(key, sink):
                    return
                pending.append(step)
                recent[key] = None
                if len(recent) > max(RECENT_SHARDS, 4 * self.ahead):
                    recent.popitem(last=False)

    def _wait_for_step(self, step: int) -> bool:
        """Wait until ``step`` is at most ``steps_ahead`` beyond the step reached; False when
        closing. Steps whose shards were all read lately read nothing: without this bound a small
        cache (every shard recent) sent the walk through the whole plan at once, past ``close``,
        holding the GIL the loader needs."""
        with self._changed:
            if step > self._reached + self.steps_ahead:
                self.stats.step_waits += 1
            while not self._stopping and step > self._reached + self.steps_ahead:
                self._changed.wait()
            return not self._stopping

    def _wait_for_room(self, step: int, pending: deque[int]) -> bool:
        """Wait until fewer than ``ahead`` shards read lie beyond the step reached (or the shard
        is needed by a step reached already); False when closing."""
        with self._changed:
            waiting = False
            while not self._stopping:
                while pending and pending[0] <= self._reached:
                    pending.popleft()
                if step <= self._reached or len(pending) < self.ahead:
                    return True
                if not waiting:
                    self.stats.waits, waiting = self.stats.waits + 1, True
                self._changed.wait()
            return False

    def _read_shard(self, key: ShardKey, sink: "PageSink") -> bool:
        """Read every file of the shard once; False when closing."""
        for directory in self.directories(key):
            if directory.fetched and not self._arrived(directory.path):
                return False
            for path in _files_under(directory.path):  # none when missing: the loader's read reports it
                if not self._read_file(path, sink):
                    return False
        self.stats.shards += 1
        return True

    def _read_file(self, path: Path, sink: "PageSink") -> bool:
        started = time.perf_counter()
        try:
            with open(path, "rb", buffering=0) as handle:
                for read in sink.read(handle, self.block_bytes):
                    self.stats.bytes += read
                    if self._stopping:
                        return False
        except OSError as err:  # evicted meanwhile, or damaged: the loader's read reports it
            self.stats.skipped_files += 1
            log.debug("read-ahead skipped %s: %s", path, err)
        finally:
            self.stats.reading_seconds += time.perf_counter() - started
        return True

    def _arrived(self, directory: Path) -> bool:
        """Wait for a shard directory the local shard cache is still fetching; False when closing."""
        with self._changed:
            while not directory.is_dir():
                if self._stopping:
                    return False
                self._changed.wait(ARRIVAL_POLL_S)
            return not self._stopping


class PageSink:
    """Reads files into the page cache: by ``sendfile`` to /dev/null where the system allows it
    (Linux: the pages are read, nothing is copied to this process; a copy into a buffer cost
    0.6 of the disk's bandwidth against 0.8 on a loaded 2-core machine), else into one reused buffer."""

    def __enter__(self) -> "PageSink":
        self.null = os.open(os.devnull, os.O_WRONLY) if hasattr(os, "sendfile") else None
        self.buffer: memoryview | None = None
        return self

    def __exit__(self, *_: object) -> None:
        if self.null is not None:
            os.close(self.null)

    def read(self, handle, block_bytes: int) -> Iterator[int]:  # noqa: ANN001 - an unbuffered binary file
        """The bytes of each block read, to the end of ``handle``; releases the GIL while the disk reads."""
        offset = 0
        while self.null is not None:
            try:
                sent = os.sendfile(self.null, handle.fileno(), offset, block_bytes)
            except OSError:  # not to /dev/null on this system: copy instead, from here on
                os.close(self.null)
                self.null = None
                break
            if not sent:
                return
            offset += sent
            yield sent
        if self.buffer is None:
            self.buffer = memoryview(bytearray(block_bytes))
        handle.seek(offset)
        while read := handle.readinto(self.buffer):
            yield read


def _files_under(directory: Path) -> list[Path]:
    found = []
    for where, _, names in os.walk(directory):
        found += [Path(where) / name for name in sorted(names)]
    return found


def shard_directories(readers: Sequence[Sequence[CacheReader]]) -> ShardDirs:
    """The feature directories of each (source, shard), from each source's ``readers`` (empty:
    nothing read ahead for that source): the local copy of a ``LocalShardReader``, the shard of a
    local cache, and those of the cache it borrows feature maps from; nothing for a cache on object
    storage read without a local shard cache (its reader fetches the shard itself)."""

    def directories(key: ShardKey) -> list[ShardDir]:
        source, shard = key
        found: list[ShardDir] = []
        for reader in readers[source]:
            while reader is not None:
                if isinstance(reader, LocalShardReader):
                    found.append(ShardDir(reader.local_dir / SHARDS_DIR / shard_name(shard) / FEATURES_DIR, fetched=True))
                elif not reader.location.remote:
                    found.append(ShardDir(reader.root / SHARDS_DIR / shard_name(shard) / FEATURES_DIR))
                reader = reader.maps_borrowed_from
        return list(dict.fromkeys(found))

    return directories


class ReadAheadSampler(Sampler):
    """``sampler``'s batches, unchanged, with a ``ShardReadAhead`` reading their shards ahead
    while they are iterated: the thread starts with the iteration's first batch (after the
    loader workers are forked) and stops when the iteration ends, is closed, or ``close()`` is called.

    Arguments:
      shards: by source, the shard of each index (``CachedRegions.shards``).
      steps: how many batches the run reads (None: endless); nothing beyond is read ahead.
    """

    def __init__(
        self,
        sampler: RankBatchSampler,
        shards: Sequence[np.ndarray],
        directories: ShardDirs,
        ahead: int,
        steps: int | None = None,
    ):
        self.sampler, self.shards, self.directories, self.ahead, self.steps = sampler, shards, directories, ahead, steps
        self.per_rank = sampler.per_rank
        self._live: set[ShardReadAhead] = set()
        self.last: ShardReadAhead | None = None  # the latest iteration's (its stats)

    def window_steps(self) -> int:
        """About the steps two windows of ``ahead`` shards last (each source's largest shard, at
        its share of the steps): the walk's lead, enough to find the next window's shards early."""
        plan, steps = self.sampler.plan, 1.0
        for shards, share in zip(self.shards, plan.probabilities):
            if len(shards) and share > 0:
                largest = int(np.unique(shards, return_counts=True)[1].max())
                steps = max(steps, 2 * self.ahead * largest / (plan.batch_size * share))
        return int(np.ceil(min(steps, 1e9)))

    def _batches(self) -> Iterable[list[Key]]:
        batches = iter(self.sampler)
        return batches if self.steps is None else itertools.islice(batches, self.steps)

    def __iter__(self) -> Iterator[list[Key]]:
        schedule = shard_schedule(self._batches(), self.shards, self.sampler.start)
        read_ahead = ShardReadAhead(schedule, self.directories, self.ahead, steps_ahead=self.window_steps())
        self._live.add(read_ahead)
        self.last = read_ahead
        read_ahead.start()
        try:
            for step, keys in enumerate(self._batches(), self.sampler.start):
                read_ahead.reached(step)
                yield keys
        finally:
            read_ahead.close()
            self._live.discard(read_ahead)

    def close(self) -> None:
        """Stop the threads of iterations still open (a loader with persistent workers keeps its iterator)."""
        for read_ahead in list(self._live):
            read_ahead.close()
            self._live.discard(read_ahead)

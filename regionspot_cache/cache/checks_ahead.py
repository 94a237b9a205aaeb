"""A process that checks shards' crc32c ahead of their reads.

Training knows which shards its next batches read (the order is a function of the seed and the
step), so a separate process can check their chunks first, on another core, and flag them in the
user's ledger (``cache/ledger.py``); the reads then find them flagged and copy without checking.
It only ever flags chunks that pass: a chunk it has not reached, or one that fails, is checked by
the read itself, which names the damaged file. A process, not a thread: a thread would need the
GIL back after every chunk, and a busy training loop holds it for milliseconds at a time.

Run as ``python -m regionspot_cache.cache.checks_ahead``; it reads one features directory per line
on its standard input and ends when that closes (its parent ended, even by ``kill -9``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import zarr

from regionspot_cache.cache.arrays import MappedChunks
from regionspot_cache.cache.ledger import ledger_directory


class ChecksAhead:
    """The parent's side: ``request`` the features directories of shards about to be read."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.requested: set[Path] = set()
        self.stopped = ledger_directory() is None  # flags it could not share would help nobody

    def request(self, directory: Path) -> None:
        """Check ``directory``'s arrays (once per run); never blocks: a request the checker has no
        room for is dropped, and the read checks those chunks itself."""
        if self.stopped or directory in self.requested:
            return
        self.requested.add(directory)
        line = (str(directory) + "\n").encode()
        if len(line) > 4096:  # beyond PIPE_BUF a write may be split
            return
        try:
            os.write(self._started().stdin.fileno(), line)
        except BlockingIOError:
            self.requested.discard(directory)  # the checker is behind; asked again later
        except OSError:  # the checker is gone: the reads check everything
            self.stopped = True

    def _started(self) -> subprocess.Popen:
        if self.process is None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "regionspot_cache.cache.checks_ahead"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            os.set_blocking(self.process.stdin.fileno(), False)
        return self.process

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.kill()  # what it has not checked yet is no longer needed
            self.process.wait()
            self.process = None
        self.stopped = True


def check_directory(directory: Path) -> int:
    """Check every unflagged chunk of the feature arrays under ``directory``; flag those that
    pass, leave the others (the reader reports them). Returns the chunks flagged."""
    flagged = 0
    try:
        group = zarr.open_group(directory, mode="r")
        arrays = [(name, array) for name, array in group.arrays()]
    except (OSError, ValueError, KeyError):
        return 0
    for name, array in arrays:
        if not array.shape or not array.shape[0]:
            continue
        mapped = MappedChunks.open(array, directory / name)
        if mapped is None or mapped.checked is None:
            continue
        for chunk in range(len(mapped.checked)):
            if not mapped.checked[chunk] and mapped.passes(chunk, mapped.chunks[chunk]):
                mapped.checked[chunk] = 1
                flagged += 1
    return flagged


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; its end closes our stdin
    for line in sys.stdin:
        check_directory(Path(line.rstrip("\n")))


if __name__ == "__main__":
    main()

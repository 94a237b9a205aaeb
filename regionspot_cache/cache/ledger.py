"""Which chunks of a feature file have passed their crc32c on this machine, shared by the user's
processes: a chunk is checked once per machine and file version instead of once per process, so
loader workers started again, DDP ranks and a later ``eval`` or ``search`` share one another's checks.

One small file of flags per feature file, in a directory of the user's alone (``/dev/shm`` when
the machine has it; ``RS_CACHE_CHECKED_DIR`` elsewhere, ``off`` to keep every check private).
A flag file is named by the feature file's version: device, inode, size, modification and
status-change times. Any write to a file, ``touch`` included, changes its status-change time,
which no user can set back, so flags outlive no change made through the file system. A file
changed within the clock's resolution of its last write could keep its times: flags are kept
privately for files written in the last ``SETTLED_S`` seconds. Damage below the file system (the
disk's own) after a check is not seen by later reads; ``rs-cache verify`` reads everything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

import numpy as np

LEDGER_ENV = "RS_CACHE_CHECKED_DIR"
SETTLED_S = 2.0  # far above any file system's timestamp resolution
TURNED_OFF = frozenset({"off", "0", "false", "no"})  # values of LEDGER_ENV that keep checks private

log = logging.getLogger(__name__)


def checked_flags(path: Path, version: os.stat_result, count: int) -> np.ndarray:
    """(count,) uint8 flags of the chunks of ``path`` as it was when ``version`` (its ``fstat``)
    was taken, 1 once a chunk's crc32c has passed: shared with the user's other processes when the
    file has settled, else this process's own."""
    if not count or time.time_ns() - version.st_ctime_ns < SETTLED_S * 1e9:
        return np.zeros(count, np.uint8)
    directory = ledger_directory()
    if directory is None:
        return np.zeros(count, np.uint8)
    try:
        return _shared_flags(directory, path, version, count)
    except (OSError, ValueError) as err:  # a full /dev/shm, a flag file of another size: check privately
        log.debug("%s: private crc32c flags (%s)", path, err)
        return np.zeros(count, np.uint8)


def ledger_directory() -> Path | None:
    """The user's flag directory, created private; None when turned off or not private."""
    configured = os.environ.get(LEDGER_ENV, "")
    if configured.lower() in TURNED_OFF:
        return None
    if configured:
        directory = Path(configured)
    else:
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        directory = base / f"regionspot-cache-checked-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = os.stat(directory)
    except OSError:
        return None
    # Flags another user could write would let them vouch for damaged data.
    if mode.st_uid != os.getuid() or stat.S_IMODE(mode.st_mode) & 0o077:
        log.warning("%s: not private to this user; crc32c checks are not shared between processes", directory)
        return None
    return directory


def _shared_flags(directory: Path, path: Path, version: os.stat_result, count: int) -> np.ndarray:
    named = hashlib.blake2b(os.path.realpath(path).encode(), digest_size=16).hexdigest()
    stamp = f"{version.st_dev}:{version.st_ino}:{version.st_size}:{version.st_mtime_ns}:{version.st_ctime_ns}"
    flags = directory / named / hashlib.blake2b(stamp.encode(), digest_size=16).hexdigest()
    flags.parent.mkdir(mode=0o700, exist_ok=True)
    if not flags.exists():
        for older in flags.parent.iterdir():  # flags of earlier versions of the file
            older.unlink(missing_ok=True)
    descriptor = os.open(flags, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        size = os.fstat(descriptor).st_size
        if size not in (0, count):
            raise ValueError(f"{flags}: {size} flags for {count} chunks")
        if size == 0:
            os.ftruncate(descriptor, count)  # zeros; another process doing the same changes nothing
    finally:
        os.close(descriptor)
    return np.asarray(np.memmap(flags, np.uint8, "r+", shape=(count,)))  # a plain view: memmap's indexing costs more

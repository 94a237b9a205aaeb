"""Devices and torch threads, resolved the same way by every phase (torch is imported where used, so
config and the CLI start without it)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from regionspot_cache.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> "torch.device":
    """``auto`` picks CUDA when present, else the CPU. A device torch does not know, or one this
    machine lacks (``cuda`` without a GPU, ``cuda:3`` with two), is refused here, before any model
    loads, rather than deep inside torch with a traceback."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"device {name!r}: not a torch device (expected auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {name!r}: this machine has no CUDA GPU (use --device cpu or auto)")
        if device.index is not None and device.index >= count:
            raise InputError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {name!r}: not supported here (expected auto, cpu, cuda, cuda:N or mps)")
    return device


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch intra-op threads (None: as they are), then restore them."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def host_available_bytes() -> int:
    """The host's MemAvailable (free plus reclaimable page cache), else its free pages where
    /proc is absent."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (a SLURM or taskset share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS and Windows
        return os.cpu_count() or 1


SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path on Linux (sun_path, less its terminating NUL)
LISTENER_NAME = len("/listener-") + 8  # multiprocessing's socket name under its temporary directory


def unix_sockets_fit() -> bool:
    """Whether a Unix socket's path fits under multiprocessing's temporary directory: Python before
    3.13 makes it under TMPDIR however long its path, and a socket path over 107 bytes fails."""
    import multiprocessing.util

    directory = multiprocessing.util.get_temp_dir()  # made once per process; its children inherit it
    return len(os.fsencode(directory)) + LISTENER_NAME <= SOCKET_PATH_MAX


def check_worker_sockets(setting: str) -> None:
    """Refuse loader workers that could not hand over a batch. Their tensors travel in shared
    memory whose file descriptors pass through a Unix socket under multiprocessing's temporary
    directory (torch's ``file_descriptor`` sharing); where that cannot be made (``unix_sockets_fit``),
    the worker's queue thread prints the error and drops the batch, and the loader waits forever."""
    import multiprocessing.util

    import torch.multiprocessing

    if torch.multiprocessing.get_sharing_strategy() != "file_descriptor" or unix_sockets_fit():
        return
    directory = multiprocessing.util.get_temp_dir()
    raise ConfigError(
        f"{setting}: loader workers hand batches over through Unix sockets under {directory}, too long "
        f"a path for one ({len(os.fsencode(directory))} bytes, at most {SOCKET_PATH_MAX - LISTENER_NAME}): "
        f"set TMPDIR to a shorter directory, or {setting}=0"
    )

"""Devices and torch threads, resolved the same way by every phase (torch is imported where used, so
config and the CLI start without it)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from regionspot_cache.errors import InputError

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


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (a SLURM or taskset share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS and Windows
        return os.cpu_count() or 1

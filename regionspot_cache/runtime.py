"""Small runtime helpers shared by the phases: devices, safe weight loading, file hashing."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

if TYPE_CHECKING:  # torch is imported where used, so config and CLI start without it
    import torch


def resolve_device(name: str) -> "torch.device":
    """``auto`` picks CUDA when present, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sha256_file(path: Path | str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded without running arbitrary code."""


def load_torch_weights(path: Path | str) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that would run code is
    refused rather than executed (checkpoints come from the web)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain "
            f"containers, and loading it could run code ({err.__class__.__name__})"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint: {err}") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write aside then rename, so readers see the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """Parse a TOML file; a missing or invalid file raises ``error`` naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid TOML: {err}") from None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine): temp files named after a dead writer's
    pid are leftovers of a kill and can go."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Loading weight files safely: tensors and plain containers only (checkpoints come from the web)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from regionspot_cache.errors import MissingFileError, ModelLoadError, UnsafeCheckpointError


def load_torch_weights(path: Path | str) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that would run code is
    refused rather than executed (checkpoints come from the web)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err) and not _looks_like_a_pickle(path):  # e.g. a text file
            raise ModelLoadError(
                f"{path}: not a torch checkpoint (expected a file written by torch.save); "
                "is it a text file or another kind of file?"
            ) from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain "
            f"containers, and loading it could run code ({err.__class__.__name__})"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:  # text files end in KeyError
        raise ModelLoadError(
            f"{path}: not a readable torch checkpoint (expected a file written by torch.save): {err.__class__.__name__}: {err}"
        ) from None


def _looks_like_a_pickle(path: Path) -> bool:
    """A torch.save zip or a raw pickle (protocol 2 and up start with 0x80): a file that holds
    objects, so a refusal of its objects is about what it could run, not about its format."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head[:1] == b"\x80" or head == b"PK"

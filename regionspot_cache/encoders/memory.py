"""Batches that fit in memory: how many images a budget holds, and retrying smaller on OOM.

On a CPU, running out of memory usually means the kernel's OOM killer, not an exception, so the
image batch is sized up front from an estimate of what one image costs in SAM's image encoder
(the largest part); an allocation that fails anyway (CUDA, or a CPU under strict overcommit)
is caught and the batch is run again in halves, and the smaller size is kept for later batches.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from regionspot_cache.encoders.sam_attention import BIAS_BYTES_PER_CALL
from regionspot_cache.runtime.devices import host_available_bytes

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

GIB = 2**30
# Share of the free memory a default budget takes: the rest is left to the data-loading workers,
# the cache writer and whatever else runs beside us.
DEFAULT_BUDGET_SHARE = 0.7
# Live activations of SAM's image encoder per token and channel, in units of the compute dtype:
# the residual stream, its norm, qkv (3x) and the MLP's hidden layer and GELU (4x each) of one
# block, plus the patch grid padded to whole 14x14 windows: 0.39 GB per ViT-B image in float32, above
# the at most 0.29 GB per image that benchmarks/memory.py measured (RESULTS.md), as a margin.
ACTIVATIONS_PER_TOKEN_CHANNEL = 24
# Per image outside the encoder: the padded 1024x1024 input in float32 and the (256, 64, 64)
# embedding it returns.
INPUT_AND_EMBEDDING_BYTES = 3 * 1024 * 1024 * 4 + 256 * 64 * 64 * 4


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device`` now: CUDA's free device memory, or the host's MemAvailable
    (free plus reclaimable page cache), falling back to free pages where /proc is absent."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def memory_budget_bytes(budget_gb: float | None, device: torch.device) -> int:
    """``budget_gb`` in bytes, or by default a share of what ``device`` has free now."""
    if budget_gb is not None:
        return int(budget_gb * GIB)
    return int(available_memory_bytes(device) * DEFAULT_BUDGET_SHARE)


def sam_image_bytes(embed_dim: int, input_size: int = 1024, dtype_bytes: int = 4) -> int:
    """Estimated peak bytes one image adds to a batch in SAM's (fused) image encoder of width
    ``embed_dim``."""
    grid = input_size // 16
    padded = -(-grid // 14) * 14
    activations = ACTIVATIONS_PER_TOKEN_CHANNEL * padded * padded * embed_dim * dtype_bytes
    return activations + INPUT_AND_EMBEDDING_BYTES


def images_within(budget_bytes: int, image_bytes: int, fixed_bytes: int = BIAS_BYTES_PER_CALL) -> int:
    """How many images fit in ``budget_bytes``; at least one (a single image is never split)."""
    return max(1, (budget_bytes - fixed_bytes) // max(image_bytes, 1))


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def release_memory(device: torch.device) -> None:
    """Give back what the failed attempt held, so the retry starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class FittingBatches:
    """Runs a function over sub-batches of at most ``limit`` items, halving the limit (and
    keeping it halved) when a sub-batch runs out of memory. A single item that does not fit
    raises the out-of-memory error: nothing smaller is left to try."""

    limit: int
    device: torch.device
    what: str = "images"

    def map(self, items: Sequence[Item], run: Callable[[Sequence[Item]], Sequence[Result]]) -> list[Result]:
        results: list[Result] = []
        start = 0
        while start < len(items):
            chunk = items[start : start + self.limit]
            done = self._attempt(chunk, run)
            if done is None:
                # Outside the except block: the error's traceback no longer pins the attempt's tensors.
                release_memory(self.device)
                self.limit = max(1, len(chunk) // 2)
                log.warning("out of memory on %d %s at once; retrying %d at a time", len(chunk), self.what, self.limit)
                continue
            results.extend(done)
            start += len(chunk)
        return results

    def stack(self, items: Sequence[Item], run: Callable[[Sequence[Item]], torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        """``map``'s per-item rows stacked into one tensor; ``empty`` when there are no items."""
        rows = self.map(items, run)
        return torch.stack(rows) if rows else empty

    @staticmethod
    def _attempt(chunk: Sequence[Item], run: Callable[[Sequence[Item]], Sequence[Result]]) -> Sequence[Result] | None:
        """``run(chunk)``, or None if it ran out of memory and a smaller chunk can be tried."""
        try:
            return run(chunk)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err) or len(chunk) == 1:
                raise
        return None

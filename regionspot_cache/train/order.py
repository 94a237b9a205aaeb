"""The order each epoch reads a training dataset's images in (``train.order``).

An order is a pure function of (seed, source, epoch): ``permutation(epoch)`` lists every index
of the dataset exactly once. The batch plan (``BatchPlan``, below) cuts these permutations into
global batches, each from one dataset chosen per step with the configured weights, and each
training process takes its slice of every batch (``RankBatchSampler``), so the order does not
depend on loader workers or processes, and a resumed run starts anywhere without replaying.

``ShardOrder`` is the order of WebDataset, Mosaic streaming and LitData: the shards in a seeded
permutation, taken ``resident`` at a time (a window), the images of a window's shards shuffled
together. An epoch then reads each shard during one window only, so a cache that does not fit
in memory or on local disk is read shard after shard (sequential bytes, whole-shard fetches)
instead of one random seek per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
from torch.utils.data import Sampler

from regionspot_cache.choices import TrainOrder
from regionspot_cache.errors import ConfigError

SHARD_STREAM = 0x5A4D  # keeps the shard permutation apart from the other draws of the same epoch


class EpochOrder(Protocol):
    size: int

    def permutation(self, epoch: int) -> np.ndarray:
        """Every index in ``range(size)`` once, in the order ``epoch`` reads them."""


@dataclass(frozen=True)
class UniformOrder:
    """A seeded permutation of all images per epoch (the order of earlier versions, draw for draw)."""

    size: int
    seed: int
    source: int = 0

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.source, epoch]).permutation(self.size)


@dataclass(frozen=True)
class ShardOrder:
    """Per epoch, the shards in a seeded order, ``resident`` at a time, images shuffled within them.

    Arguments:
      shards (np.ndarray): (size,) the shard of each index of the dataset.
      resident (int): how many shards are mixed at once (and read during one window).
    """

    shards: np.ndarray
    seed: int
    resident: int
    source: int = 0

    @property
    def size(self) -> int:
        return len(self.shards)

    def shard_ids(self) -> np.ndarray:
        return np.unique(self.shards)

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The shards of each window of ``epoch``, in reading order."""
        rng = np.random.default_rng([self.seed, self.source, epoch, SHARD_STREAM])
        walk = rng.permutation(self.shard_ids())
        return [walk[i : i + self.resident] for i in range(0, len(walk), self.resident)]

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.source, epoch])
        by_shard = np.argsort(self.shards, kind="stable")  # indices grouped by shard, each group ascending
        starts = np.searchsorted(self.shards[by_shard], self.shard_ids())
        ends = np.append(starts[1:], len(by_shard))
        where = {int(s): by_shard[a:b] for s, a, b in zip(self.shard_ids(), starts, ends)}
        parts = [rng.permutation(np.concatenate([where[int(s)] for s in window])) for window in self.windows(epoch)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def epoch_order(order: TrainOrder, shards: np.ndarray, seed: int, source: int, resident: int) -> EpochOrder:
    """The order ``order`` names for a dataset whose index ``i`` lies in shard ``shards[i]``."""
    if order.by_shards:
        return ShardOrder(np.asarray(shards, dtype=np.int64), seed, resident, source)
    return UniformOrder(len(shards), seed, source)


# Steps whose dataset choices are drawn from one seeded generator; resuming at step s replays
# only s / CHOICE_BLOCK small draws.
CHOICE_BLOCK = 4096

Key = tuple[int, int, int]  # (source, epoch, index within the source)


class EpochSampler(Sampler):
    """Endless epochs of one dataset in ``order`` (default: uniform seeded shuffles), yielding
    ``(epoch, index)``; can start anywhere."""

    def __init__(self, size: int, seed: int, start: int = 0, source: int = 0, order: EpochOrder | None = None):
        self.size, self.seed, self.start, self.source = size, seed, start, source
        self.epoch_order = order or UniformOrder(size, seed, source)

    def order(self, epoch: int) -> np.ndarray:
        return self.epoch_order.permutation(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            for index in self.order(epoch)[offset:].tolist():
                yield epoch, index
            epoch, offset = epoch + 1, 0


class BatchPlan:
    """Which dataset and which images make the global batch of each step.

    The dataset of step ``s`` is drawn with probability proportional to ``weights``; each dataset
    walks its own endless sequence of epochs in its ``orders`` entry (default: uniform seeded
    shuffles; see ``train/order.py``), ``batch_size`` images per batch it serves.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        seed: int,
        orders: Sequence[EpochOrder] | None = None,
    ):
        if len(weights) != len(sizes) or any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ConfigError(f"dataset weights {list(weights)} must be {len(sizes)} non-negative numbers, not all zero")
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.orders = list(orders) if orders is not None else [UniformOrder(n, seed, i) for i, n in enumerate(sizes)]
        if [order.size for order in self.orders] != self.sizes:
            raise ValueError(f"orders of sizes {[o.size for o in self.orders]} for datasets of sizes {self.sizes}")
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)

    def sources(self, block: int) -> np.ndarray:
        """The dataset of each step in ``[block * CHOICE_BLOCK, (block + 1) * CHOICE_BLOCK)``."""
        if len(self.sizes) == 1:
            return np.zeros(CHOICE_BLOCK, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 0x5EED, block])
        return rng.choice(len(self.sizes), CHOICE_BLOCK, p=self.probabilities)

    def batches_before(self, step: int) -> np.ndarray:
        """How many batches each dataset has served before ``step``."""
        counts = np.zeros(len(self.sizes), dtype=np.int64)
        full, partial = divmod(step, CHOICE_BLOCK)
        for block in range(full):
            counts += np.bincount(self.sources(block), minlength=len(self.sizes))
        counts += np.bincount(self.sources(full)[:partial], minlength=len(self.sizes))
        return counts

    def global_batches(self, start: int) -> Iterator[list[Key]]:
        """The keys of the global batch of every step from ``start`` on."""
        streams = [
            iter(EpochSampler(size, self.seed, int(served) * self.batch_size, source, self.orders[source]))
            for source, (size, served) in enumerate(zip(self.sizes, self.batches_before(start)))
        ]
        step = start
        while True:
            block, offset = divmod(step, CHOICE_BLOCK)
            for source in self.sources(block)[offset:].tolist():
                yield [(source, *next(streams[source])) for _ in range(self.batch_size)]
            step = (block + 1) * CHOICE_BLOCK


class RankBatchSampler(Sampler):
    """This process's contiguous share of each global batch (all of it without DDP)."""

    def __init__(self, plan: BatchPlan, start: int, rank: int = 0, world_size: int = 1):
        if plan.batch_size % world_size:
            raise ConfigError(f"batch size {plan.batch_size} is not divisible by the {world_size} training processes")
        self.plan, self.start, self.rank = plan, start, rank
        self.per_rank = plan.batch_size // world_size

    def __iter__(self) -> Iterator[list[Key]]:
        return self.shares(range(self.rank, self.rank + 1))

    def shares(self, ranks: range) -> Iterator[list[Key]]:
        """The shares of the consecutive processes ``ranks`` of each global batch, together (what
        the processes of one node read: each process can tell every other's)."""
        for keys in self.plan.global_batches(self.start):
            yield keys[ranks.start * self.per_rank : ranks.stop * self.per_rank]

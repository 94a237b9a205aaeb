"""The order each epoch reads a training dataset's images in (``train.order``).

An order is a pure function of (seed, source, epoch): ``permutation(epoch)`` lists every index
of the dataset exactly once. The batch plan (``train/data.py``) cuts these permutations into
global batches and each training process takes its slice of every batch, so the order does not
depend on loader workers or processes, and a resumed run starts anywhere without replaying.

``ShardOrder`` is the order of WebDataset, Mosaic streaming and LitData: the shards in a seeded
permutation, taken ``resident`` at a time (a window), the images of a window's shards shuffled
together. An epoch then reads each shard during one window only, so a cache that does not fit
in memory or on local disk is read shard after shard (sequential bytes, whole-shard fetches)
instead of one random seek per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from regionspot_cache.choices import TrainOrder

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

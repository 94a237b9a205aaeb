"""The training processes of one node sharing its local shard cache (``train.local_cache_dir``).

With DDP every process reads a slice of every global batch, so the processes of a node all read
every shard of a window: each keeping its own copy fetched the cache once per process. Instead
the node's first process (``LOCAL_RANK`` 0) fetches the shards of the node's slices, once, into
one directory that every process of the node reads (a fetch lands by one rename, so a shard
directory that exists is whole), and evicts a shard only once every process of the node has
delivered the node's last step that needs it. Each process publishes its last delivered step in
``NodeProgress``, a small file of the directory that all of them map; no other coordination.
"""

from __future__ import annotations

import fcntl
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from regionspot_cache.errors import ConfigError
from regionspot_cache.train.distributed import Processes

PROGRESS_FILE = "progress"  # one int64 per process of the node: the last step it delivered
CLOSED_PREFIX = "closed-"  # closed-<index>: that process of the node has closed the cache
LOCK_FILE = "node.lock"


@dataclass(frozen=True)
class NodeShare:
    """The processes ``first .. first + size - 1`` (global ranks) of one node; this one is ``index``
    among them. torchrun gives the processes of a node consecutive ranks; ``node_root`` checks it."""

    first: int = 0
    index: int = 0
    size: int = 1

    @classmethod
    def of(cls, processes: Processes) -> "NodeShare":
        if processes.local_world_size <= 1:  # no LOCAL_WORLD_SIZE: a node of its own (as before)
            return cls(processes.rank, 0, 1)
        return cls(processes.rank - processes.local_rank, processes.local_rank, processes.local_world_size)

    @property
    def ranks(self) -> range:
        return range(self.first, self.first + self.size)

    @property
    def fetches(self) -> bool:
        """This process fetches and evicts the node's shards (the others only read them)."""
        return self.index == 0


def node_root(shared: Sequence[tuple[NodeShare, str | None]], node: NodeShare) -> Path:
    """The node's directory, from every process's (share, directory made by the node's first
    process or None) in rank order; refuses local ranks that are not consecutive global ranks."""
    members = [rank for rank, (share, _) in enumerate(shared) if share.first == node.first]
    if members != list(node.ranks) or [shared[r][0].index for r in members] != list(range(node.size)):
        raise ConfigError(
            f"LOCAL_RANK/LOCAL_WORLD_SIZE: ranks {members} say they share a node with rank {node.first}, "
            f"expected ranks {list(node.ranks)} with local ranks 0..{node.size - 1} (as torchrun sets them)"
        )
    return Path(shared[node.first][1])


class NodeProgress:
    """The last step each process of the node delivered (-1: none yet), in ``root/progress``, made
    by the fetching process before the others open it; stores of one int64 are seen whole."""

    def __init__(self, root: Path, node: NodeShare):
        path = Path(root) / PROGRESS_FILE
        if node.fetches:
            np.full(node.size, -1, dtype=np.int64).tofile(path)
        self.steps = np.memmap(path, dtype=np.int64, mode="r+", shape=(node.size,))
        self.index = node.index

    def delivered(self, step: int) -> None:
        self.steps[self.index] = step

    def least(self) -> int:
        """The last step every process of the node has delivered."""
        return int(self.steps.min())


def leave_node(root: Path, node: NodeShare) -> None:
    """Mark this process done with ``root``; the last process of the node to do so removes it."""
    with open(root / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # marks checked and made one process at a time
        (root / f"{CLOSED_PREFIX}{node.index}").touch()
        if all((root / f"{CLOSED_PREFIX}{i}").exists() for i in range(node.size)):
            shutil.rmtree(root, ignore_errors=True)

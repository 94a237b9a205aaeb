"""Multi-process training with ``torchrun`` and DistributedDataParallel.

``torchrun --nproc-per-node N -m regionspot_cache train ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``/``LOCAL_WORLD_SIZE``; each process then trains on its share of every global batch (see
``train_data.RankBatchSampler``). The loss of each process is normalised by the box count of the
whole global batch, so the averaged gradients equal those of one process taking the global
batch: N processes follow the same trajectory as one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from regionspot_cache.runtime.devices import resolve_device


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the processes on this node (they share its local shard cache)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join_process_group(device_name: str) -> tuple[Processes, torch.device]:
    """Join the process group that torchrun describes in the environment (if any), picking NCCL
    on GPUs and gloo on CPUs, and the device of this process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, local_world_size), device


def leave_process_group(processes: Processes) -> None:
    """Destroy the process group that ``join_process_group`` joined (nothing with one process)."""
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def global_sum(value: torch.Tensor, processes: Processes) -> torch.Tensor:
    """Sum of ``value`` over all processes (itself with one process)."""
    if not processes.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def gather_objects(value: object, processes: Processes) -> list[object]:
    """``value`` of every process, in rank order."""
    if not processes.distributed:
        return [value]
    gathered: list[object] = [None] * processes.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()

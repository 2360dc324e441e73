"""This process's place in a data-parallel group, and joining one from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in a data-parallel group (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Dist:
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world=dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value


def init_from_env(timeout_min: float = 60.0) -> bool:
    """Join the process group described by the environment (torchrun, or a SLURM job's
    exported WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT); True if this call started it.

    nccl with one GPU per local rank when CUDA is available, else gloo. Collectives wait
    `timeout_min` (the run's `parallel.timeout_min`) for the other ranks: longer than
    rank 0 alone takes to write a checkpoint or evaluate the EMA weights.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return False  # one process, not under torchrun (which also starts groups of one)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            timeout=timedelta(minutes=timeout_min))
    return True

"""Task evaluation split over the ranks of a job, and reduced.

Rank r of W evaluates items r, r + W, r + 2W, ... of every task and keeps one
record per item (its log-likelihoods, answer tokens and bytes, correctness);
the records are gathered on every rank and the task's metrics are computed
from all of them in item order, exactly as one process does. Which rank
holds an item changes nothing but batching (float rounding, ~1e-7 relative):
few-shot examples are chosen by the item's index and sampled answers are seeded
by it (`moe.eval.generate`).

**Lockstep.** A model sharded with FSDP2 or expert parallelism runs collectives
inside its forward pass (weight all-gathers, token all-to-alls), so every rank
must call it equally often, though ranks hold different numbers of items and
generation stops at different lengths. `Lockstep` makes each forward call a
vote: before every call each rank all-reduces 1 (it has work) or, once its
own work is done, 0; while the sum is positive the finished ranks run a one-token
dummy forward. A replicated model (one process, DDP) needs none of this: each
rank evaluates its items on its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class EvalShard:
    """This rank's share of an evaluation (rank 0 of 1: everything, no communication)."""

    rank: int = 0
    world: int = 1
    lockstep: bool = False
    """The model's forward runs collectives (FSDP2, expert parallelism): see `Lockstep`."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a group of {self.world}")

    @classmethod
    def current(cls, *, lockstep: bool = False) -> EvalShard:
        """This process's place in the default process group (one process without one)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), lockstep)
        return cls(lockstep=lockstep)

    def items(self, n: int) -> list[int]:
        """Indices of this rank's items out of n (strided, so every rank gets n/W +- 1)."""
        return list(range(self.rank, n, self.world))

    def gather(self, records: list[Any]) -> list[Any]:
        """Every rank's records, concatenated in rank order (on every rank)."""
        if self.world == 1:
            return list(records)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, records)
        return [r for part in parts for r in part]


class Lockstep:
    """A sharded model whose forward calls are matched across ranks (module docstring).

    Call `drain()` on every rank once its own work is done and before any other
    collective: it keeps running dummy forwards while another rank still has work.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str, pad_id: int):
        self.model, self.device, self.pad_id = model, torch.device(device), pad_id

    def __getattr__(self, name: str):  # new_cache, config, ...: the model's own
        return getattr(self.model, name)

    def _vote(self, busy: int) -> int:
        flag = torch.tensor([busy], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag)
        return int(flag.item())

    def __call__(self, *args, **kwargs):
        self._vote(1)
        return self.model(*args, **kwargs)

    def drain(self) -> None:
        """Dummy forwards until no rank has work left."""
        while self._vote(0):
            self.model(torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device))

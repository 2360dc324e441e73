"""Checkpoint at the next step boundary when the scheduler warns that the job will stop.

Before a SLURM job's time limit (or on preemption) submitit sends a signal (SIGUSR2 by
default) and its handler requeues the job at once. Inside `PreemptionWatch` that signal
only marks a request while the training loop runs: at the end of the current step every
rank agrees (one all-reduce of a flag per step), the loop writes a checkpoint, and then
the handler that was installed before (submitit's: it calls `RunJob.checkpoint()` and
requeues) runs on rank 0, while the other ranks raise `Preempted`. Outside the loop
(setup, final evaluation) the signal goes straight to that handler, as without a watch.

The warning must come at least one step (plus a checkpoint) before the limit: submitit's
`slurm_signal_delay_s` (90 s by default) is that margin.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist


class Preempted(RuntimeError):
    """This rank stopped at a step boundary after a checkpoint; the job is being requeued."""


_ACTIVE: list[PreemptionWatch] = []


class PreemptionWatch:
    """Context manager: defer `signum` to the training loop's next step boundary."""

    def __init__(self, signum: int = signal.SIGUSR2) -> None:
        self.signum = signum
        self.pending = False
        self.in_loop = False
        self.previous = None

    def __enter__(self) -> PreemptionWatch:
        self.previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        signal.signal(self.signum, self.previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.in_loop:
            self.pending = True
        else:
            self._forward(frame)

    def _forward(self, frame: FrameType | None) -> None:
        if callable(self.previous):
            self.previous(self.signum, frame)

    def poll(self, world: int, device: torch.device | str = "cpu") -> bool:
        """At a step boundary: did any rank get the signal? (the same answer on every rank)

        The flag lives on the run's `device`: NCCL reduces CUDA tensors only.
        """
        flag = torch.tensor([1.0 if self.pending else 0.0], device=device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def hand_over(self, rank: int) -> None:
        """After the checkpoint: let the previous handler requeue (rank 0), then stop."""
        self.in_loop = self.pending = False
        if rank == 0:
            self._forward(None)
        raise Preempted("stopped at a step boundary after a checkpoint; requeued")


def active_watch() -> PreemptionWatch | None:
    """The innermost watch of this process, if any."""
    return _ACTIVE[-1] if _ACTIVE else None

"""Stop a run on SIGTERM or SIGHUP as on Ctrl-C, with a checkpoint first.

`kill`, `timeout`, `scancel`, a SLURM time limit and torchrun's shutdown send SIGTERM; a
closed terminal or ssh session sends SIGHUP. Their default action ends the process where
it stands, leaving status.json `running` with no reason. Inside `StopSignals` the first
such signal only marks a request while the training loop runs: the step ends, every rank
agrees at the step boundary (`poll`), the loop writes a checkpoint and raises `Terminated`;
the run is then marked `failed` with the signal as the reason and `moe train` exits
128 + the signal number (143 for SIGTERM, 129 for SIGHUP, the shell's convention).
Rerunning resumes from that checkpoint. Outside the loop (setup, the final evaluation) and
on a second signal, `Terminated` is raised at once (the last checkpoint stays valid).

Only signals left at their default action are taken, so nobody else's handling changes:
under submitit, SIGTERM is submitit's (it ignores SIGTERM, which SLURM sends after a
requeue, and checkpoints on its own warning signal: `moe.train.preempt`); under `nohup`
SIGHUP stays ignored; a sweep launcher's own handler stays; off the main thread nothing is
installed (Python delivers signals to the main thread only).
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The run stopped on SIGTERM or SIGHUP; `exit_code` is 128 + the signal number.

    A KeyboardInterrupt, like Ctrl-C: everything that cleans up after an interrupt (the
    writer lock, a launcher's workers) does so here too.
    """

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = f" after the checkpoint at step {step}" if step is not None else ""
        super().__init__(f"stopped by {name}{where}; rerun to resume")


class StopSignals:
    """Context manager: SIGTERM and SIGHUP end the training loop at a step boundary."""

    def __init__(self, signums: tuple[int, ...] = SIGNALS) -> None:
        self.signums = signums
        self.received: int | None = None
        """The first signal that arrived while the loop ran (None: none yet)."""
        self.in_loop = False
        self._previous: dict[int, object] = {}

    @property
    def active(self) -> bool:
        """Whether any signal is handled here (else `poll` is free: no collective)."""
        return bool(self._previous)

    def __enter__(self) -> StopSignals:
        for signum in self.signums:
            try:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.in_loop and self.received is None:
            self.received = signum
            return
        raise Terminated(signum)

    def poll(self, world: int, device: torch.device | str = "cpu") -> int | None:
        """At a step boundary: the signal any rank received (the same answer on every rank).

        Every rank of a job runs the same code under the same dispositions, so either all
        take part in the all-reduce or none does.
        """
        if not self.active:
            return None
        flag = torch.tensor([float(self.received or 0)], device=device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

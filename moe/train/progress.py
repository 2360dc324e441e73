"""Training progress for whoever watches: a bar on a terminal, one line at a time elsewhere.

A SLURM job, a local sweep worker or `moe train > log` writes to a file, where a progress
bar prints nothing until it closes (tqdm draws only on a terminal). There, a line

    progress: step 120/3000 (4.0%)  tokens 1.97M/49.2M  loss 3.412  12.3k tokens/s  ETA 3m54s

goes to stderr every `log.progress_every_s` seconds (30 by default), after the first step
and after the last; on a terminal the bar is drawn as before. tokens/s is measured over
the steps since the previous line, and the ETA extrapolates that rate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from moe.params import format_count


class Progress:
    """Report steps `start`..`n_steps` of a run, each of `tokens_per_step` tokens."""

    def __init__(self, n_steps: int, start: int, tokens_per_step: int, *, every_s: float,
                 stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.n_steps, self.tokens_per_step = n_steps, tokens_per_step
        self.every_s = every_s
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self._bar = None
        if _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=n_steps, initial=start, unit="step", dynamic_ncols=True,
                             file=self.stream)
        self._last_step, self._last_t = start, clock()

    def update(self, step: int, loss: float) -> None:
        """Step `step` (1-based count of steps done) finished with training loss `loss`."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            return
        if not self.every_s:
            return
        now = self.clock()
        first = self._last_step == step - 1 and step == 1
        if now - self._last_t >= self.every_s or step == self.n_steps or first:
            self.stream.write(self.line(step, loss, now) + "\n")
            self.stream.flush()
            self._last_step, self._last_t = step, now

    def line(self, step: int, loss: float, now: float) -> str:
        """The one-line report at `step` (rate over the steps since the previous line)."""
        elapsed = now - self._last_t
        done = step - self._last_step
        rate = done * self.tokens_per_step / elapsed if elapsed > 0 and done > 0 else None
        eta = (self.n_steps - step) * self.tokens_per_step / rate if rate else None
        tokens = f"{format_count(step * self.tokens_per_step)}/" \
                 f"{format_count(self.n_steps * self.tokens_per_step)}"
        return (f"progress: step {step}/{self.n_steps} ({100 * step / self.n_steps:.1f}%)  "
                f"tokens {tokens}  loss {loss:.4g}  "
                f"{'-' if rate is None else format_count(rate)} tokens/s  "
                f"ETA {'-' if eta is None else format_duration(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s'; 59.4 -> '59s'."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

"""`moe.train.progress`: one-line progress where nobody watches a terminal, a bar where one does."""

from __future__ import annotations

import io
import re

from moe.train.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_every_interval_with_rate_and_eta_from_the_steps_between():
    out, clock = io.StringIO(), Clock()
    progress = Progress(n_steps=100, start=0, tokens_per_step=2048, every_s=30, stream=out,
                        clock=clock)
    for step in range(1, 101):
        clock.t += 2.0  # 2 s a step: 1024 tokens/s
        progress.update(step, loss=5.0 - step / 100)
    lines = out.getvalue().splitlines()
    # after the first step, then whenever 30 s have passed (every 15 steps), and the last
    assert [int(re.search(r"step (\d+)/", x).group(1)) for x in lines] == \
        [1, 16, 31, 46, 61, 76, 91, 100]
    assert lines[1] == ("progress: step 16/100 (16.0%)  tokens 32.8k/205k  loss 4.84  "
                        "1.02k tokens/s  ETA 2m48s")  # 84 steps x 2 s left
    assert lines[-1].endswith("ETA 0s")


def test_nothing_between_intervals_and_nothing_when_off():
    out, clock = io.StringIO(), Clock()
    progress = Progress(n_steps=10, start=3, tokens_per_step=10, every_s=0, stream=out,
                        clock=clock)
    for step in range(4, 11):
        progress.update(step, loss=1.0)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_not_lines():
    out, clock = Terminal(), Clock()
    progress = Progress(n_steps=10, start=0, tokens_per_step=10, every_s=30, stream=out,
                        clock=clock)
    for step in range(1, 11):
        clock.t += 100
        progress.update(step, loss=1.0)
    progress.close()
    assert "progress:" not in out.getvalue() and "10/10" in out.getvalue()


def test_durations():
    assert [format_duration(s) for s in (0.4, 59.4, 61, 3725)] == ["0s", "59s", "1m01s",
                                                                    "1h02m05s"]

"""Process identity that survives PID reuse (a PID plus the process's start time), and the
cores a process may run on.

The OS recycles PIDs, so "process 1234 is alive" says nothing about whether it
is the process that was recorded. Linux gives every process a start time
(field 22 of /proc/PID/stat, in clock ticks since boot) that a reused PID does
not share; recording it beside the PID and comparing it later tells the two apart.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def affinity_cores() -> int:
    """Cores this process may run on: its CPU affinity (a SLURM allocation, `taskset`),
    or the machine's count where the platform has no affinity."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fork_usable() -> bool:
    """Whether this process may fork workers: POSIX, and not itself daemonic
    (multiprocessing forbids a daemon children)."""
    return os.name == "posix" and not multiprocessing.current_process().daemon


def fork_pool(workers: int) -> ProcessPoolExecutor | None:
    """A pool of min(workers, usable cores) forked processes, or None where the work should
    run inline (fewer than 2 of them, or `fork_usable` says no). Forked workers share what
    this process has imported, so only the arguments and results are pickled."""
    n = min(workers, affinity_cores())
    if n < 2 or not fork_usable():
        return None
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (None where /proc is unavailable or the
    process does not exist)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may hold spaces: split after the last ')'.
    rest = stat.rsplit(")", 1)[-1].split()
    try:
        return int(rest[19])  # fields 3.. follow; field 22 is index 22 - 3
    except (IndexError, ValueError):
        return None


def is_same_process_alive(pid: int, start_time: int | None) -> bool:
    """True while `pid` runs, is not a zombie and (when known) started at `start_time`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    state = _state(pid)
    if state == "Z":
        return False
    if start_time is not None:
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return False  # the PID was reused by another process
    return True


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None

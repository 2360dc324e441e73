"""Fit a run to this machine before anything is allocated or written.

`check_resources` compares `moe.params.estimate_train_memory` with the memory of
the device the run will use (the GPU's, or the machine's RAM: the smaller of
physical memory and the cgroup limit) and the thread count with the CPUs.

`train.num_threads = "auto"` picks the CPU thread count at start (`auto_num_threads`):
more threads pay only on cores no other process keeps busy, and only when torch's ops
are big enough to split (docs/architecture.md, "CPU threads"). Measured on 2 cores
(benchmarks/bench_cpu.py): pocket models (d_model 32-64) train 1.3-1.6x faster on 2
idle cores than on 1, but 2-3x slower on 2 threads beside a busy loop (and up to 11x
beside another job), because a step is thousands of small ops and every one waits for
the slower thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from moe.config import ConfigError, RunConfig
from moe.params import estimate_train_memory, train_flops_per_token
from moe.procs import affinity_cores

THREADS_PER_CPU = 4
"""train.num_threads above this many per CPU core is refused (oversubscription, crashes)."""
GiB = 1 << 30
MIN_FLOPS_PER_THREAD = 2.5e8
"""Training FLOPs of one micro-batch per thread below which another thread costs more in
per-op hand-offs than it adds. On 2 idle cores (bench_cpu.py) even the smallest pocket
model (d_model 32, 0.7 GFLOP a micro-batch) ran 1.3x faster on 2 threads; beside a busy
loop every pocket model ran 2-3x slower on 2, which the free-core count decides."""
FREE_SLACK = 0.25
"""A core counts as free when other processes keep it busy less than this fraction."""
CORES_ENV = "OMP_NUM_THREADS"
"""Threads a job may use (OpenMP's variable, which torch's default also follows): the local
launcher sets it to the cores / max_parallel for runs side by side."""


class ResourceError(ConfigError):
    """The run needs more memory or threads than this machine has."""


def machine_memory_bytes() -> int | None:
    """Physical RAM, or the cgroup memory limit when it is lower (None when unknown)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = int(text) if ram is None else min(ram, int(text))
    return ram


def device_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what) of the memory a run on `device` allocates from."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    return machine_memory_bytes(), "this machine's RAM"


def choose_num_threads(*, flops_per_step: float, cores: int, busy_cores: float) -> int:
    """Threads for a run: one per core that is free (busy less than FREE_SLACK) and not more
    than the micro-batch's FLOPs can keep busy (MIN_FLOPS_PER_THREAD each); at least 1."""
    free = math.floor(cores - max(busy_cores, 0.0) + FREE_SLACK)
    by_size = int(flops_per_step // MIN_FLOPS_PER_THREAD)
    return max(1, min(cores, free, by_size))


def usable_cores() -> int:
    """This process's share of the cores: its CPU affinity, divided among the ranks of this
    node and capped by OMP_NUM_THREADS (set by a launcher or the user)."""
    cores = affinity_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cap = os.environ.get(CORES_ENV, "")
    if cap.isdigit() and int(cap) > 0:
        cores = min(cores, int(cap))
    return max(1, cores)


def busy_cores(sample_s: float = 0.1) -> float:
    """Cores of this process's affinity kept busy by other processes now: a /proc/stat sample
    over `sample_s` (this process sleeps meanwhile), else the 1-minute load average."""
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times(cpus)
        time.sleep(sample_s)
        after = _cpu_times(cpus)
    except (AttributeError, OSError, ValueError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    busy = 0.0
    for cpu, (total, idle) in after.items():
        d_total, d_idle = total - before[cpu][0], idle - before[cpu][1]
        busy += (d_total - d_idle) / d_total if d_total > 0 else 0.0
    return busy


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (total jiffies, idle + iowait jiffies)} from /proc/stat for these CPUs."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            times[int(name[3:])] = (sum(values), values[3] + values[4])
    if not times:
        raise ValueError("no per-CPU lines in /proc/stat")
    return times


def auto_num_threads(cfg: RunConfig, world: int = 1) -> int:
    """`choose_num_threads` for this run's micro-batch on the cores free now."""
    micro_rows = getattr(getattr(cfg, "parallel", None), "micro_batch", 0) or \
        cfg.train.batch_size // cfg.train.grad_accum // max(world, 1)
    flops = train_flops_per_token(cfg.model) * micro_rows * cfg.model.seq_len
    return choose_num_threads(flops_per_step=flops, cores=usable_cores(),
                              busy_cores=busy_cores())


def apply_num_threads(cfg: RunConfig, device: torch.device, world: int = 1) -> int:
    """Set torch's CPU threads from train.num_threads; returns the count in use. "auto" on a
    GPU keeps torch's default (the CPU only feeds the GPU there)."""
    wanted = cfg.train.num_threads
    if wanted == "auto" and device.type == "cpu":
        wanted = auto_num_threads(cfg, world)
    if isinstance(wanted, int) and wanted > 0:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's mallopt parameters (malloc.h)."""


def retain_freed_memory() -> bool:
    """Keep memory that torch frees on the heap for the next step (glibc; False elsewhere).

    By default glibc maps blocks above a moving threshold straight from the kernel and
    returns the heap's free top to it, so, depending on what the process freed before (the
    threshold rises to the largest mapped block freed so far), every training step can
    fault its activations' pages in again: 1-2k page faults per pocket step, 5-13% of its
    CPU time. Blocks up to 32 MiB now come from the heap, which is trimmed only above 1 GiB
    free.
    """
    return set_heap_thresholds(mmap=32 << 20, trim=1 << 30)


def set_heap_thresholds(*, mmap: int, trim: int) -> bool:
    """glibc's mallopt(M_MMAP_THRESHOLD, mmap) and (M_TRIM_THRESHOLD, trim), which also turn
    off its moving threshold (mallopt(3)); False where there is no glibc or it refuses."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def check_resources(cfg: RunConfig, device: torch.device, world: int = 1) -> None:
    """ResourceError (one line, naming what to change) when the run cannot fit."""
    cpus = os.cpu_count() or 1
    threads = cfg.train.num_threads
    if isinstance(threads, int) and threads > THREADS_PER_CPU * cpus:
        raise ResourceError(f"train.num_threads={cfg.train.num_threads} is more than "
                            f"{THREADS_PER_CPU} x the {cpus} CPU cores; use at most "
                            f"{THREADS_PER_CPU * cpus} (or 0 for torch's default)")
    parallel = getattr(cfg, "parallel", None)  # sharded optimizer states, when configured
    sharded = getattr(parallel, "data", None) == "fsdp"
    need = estimate_train_memory(cfg, world, shard_states=sharded,
                                 attention_scores=device.type != "cuda")
    have, what = device_memory_bytes(device)
    if device.type != "cuda":  # the ranks on this node share its RAM
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        need = replace(need, params=need.params * local_ranks,
                       optimizer=need.optimizer * local_ranks,
                       activations=need.activations * local_ranks)
    if have is not None and need.total > have:
        raise ResourceError(
            f"the run needs about {need.total / GiB:.1f} GiB (parameters "
            f"{need.params / GiB:.1f}, optimizer {need.optimizer / GiB:.1f}, activations "
            f"{need.activations / GiB:.1f} at {need.micro_batch} sequences per micro-batch) but "
            f"{what} has {have / GiB:.1f} GiB; reduce the model, train.batch_size or "
            "model.seq_len, or raise train.grad_accum")

"""Refuse a run that cannot fit this machine, before anything is allocated or written.

`check_resources` compares `moe.params.estimate_train_memory` with the memory of
the device the run will use (the GPU's, or the machine's RAM: the smaller of
physical memory and the cgroup limit) and the thread count with the CPUs.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from moe.config import ConfigError, RunConfig
from moe.params import estimate_train_memory

THREADS_PER_CPU = 4
"""train.num_threads above this many per CPU core is refused (oversubscription, crashes)."""
GiB = 1 << 30


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


def check_resources(cfg: RunConfig, device: torch.device, world: int = 1) -> None:
    """ResourceError (one line, naming what to change) when the run cannot fit."""
    cpus = os.cpu_count() or 1
    if cfg.train.num_threads > THREADS_PER_CPU * cpus:
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

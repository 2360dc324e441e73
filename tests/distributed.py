"""Run a function on W gloo ranks on 127.0.0.1 (forked: nothing is imported again), for tests."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """fn(*args) on `world` processes of one gloo group; raises if any of them fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="fork")


def train_in(run_dir: str, overrides: list[str]) -> None:
    """Train tests.helpers.tiny_config(*overrides) in run_dir (every rank calls it)."""
    from moe.train import train_run
    from tests.helpers import tiny_config

    train_run(tiny_config(*overrides), run_dir)

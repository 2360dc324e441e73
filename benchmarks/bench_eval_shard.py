"""Task evaluation split over processes: wall time on 1 vs 2 gloo processes (CPU).

    python benchmarks/bench_eval_shard.py [--items 40] [--config configs/pocket-tiny.toml]

A freshly initialised model of the config (seed 0) is evaluated on the pocket tasks
(`--items` items each, task losses and greedy accuracy) by one process, then by 2
processes each holding a copy and evaluating every other item (`moe.eval.shard`), then by
2 FSDP2 ranks in lockstep. One thread per process. Prints the wall times, the speed-up
over one process, and the largest relative difference of a task loss.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _evaluate(config: str, items: int, fsdp: bool, out) -> None:
    import torch
    import torch.distributed as dist

    from moe.config import load_config
    from moe.data.shards import load_data
    from moe.eval import EvalShard, evaluate_tasks
    from moe.model import MoELM

    sets = ["train.num_threads=1", f"eval.max_items={items}", "eval.accuracy=true",
            'eval.tasks=["pocket-memorization","pocket-reasoning"]']
    cfg = load_config(config, sets + (["parallel.data=fsdp"] if fsdp else []))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    if fsdp:
        from moe.train.distributed import Dist
        from moe.train.parallel import parallelize

        model, _ = parallelize(model, cfg, torch.device("cpu"), Dist.current(), bf16=False)
    tok = load_data(cfg.data, cfg.model.seq_len).tokenizer
    shard = EvalShard.current(lockstep=fsdp)
    if shard.world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tok, cfg, device="cpu", shard=shard)
    if shard.rank == 0:
        out.put((time.perf_counter() - t0, {k: v["loss"] for k, v in res.items()}))


def _rank(rank: int, port: int, config: str, items: int, fsdp: bool, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _evaluate(config, items, fsdp, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--config", default=str(ROOT / "configs" / "pocket-tiny.toml"))
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_evaluate, args=(args.config, args.items, False, out))
    proc.start()
    one_s, one = out.get()
    proc.join()
    print(f"{'layout':<22} {'wall s':>8} {'speed-up':>9} {'max rel. loss diff':>19}")
    print(f"{'1 process':<22} {one_s:8.2f} {1.0:9.2f} {0.0:19.1e}")
    for name, fsdp in (("2 processes, copies", False), ("2 FSDP2 ranks, lockstep", True)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_rank, args=(port, args.config, args.items, fsdp, out), nprocs=2,
                           join=True, start_method="fork")
        two_s, two = out.get()
        diff = max(abs(two[k] - one[k]) / abs(one[k]) for k in one)
        print(f"{name:<22} {two_s:8.2f} {one_s / two_s:9.2f} {diff:19.1e}")


if __name__ == "__main__":
    main()

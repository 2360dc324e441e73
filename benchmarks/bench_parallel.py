"""Scale-out numbers: CPU step time on 1 vs 2 processes, the paper grid's plan, memory.

    python benchmarks/bench_parallel.py [--steps 10] [--config configs/pocket-tiny.toml]

1. CPU step time of pocket-tiny (median over `--steps` steps after 2 warm-up steps) on one
   process and on 2 gloo processes (DDP, FSDP2, FSDP2 + expert parallel 2), one thread per
   process. The same global batch every time: 2 processes each do half of it.
2. The paper grid (sweeps/paper.toml) planned on slurm/profiles/h100x8.toml: runs per GPU
   count, GPU-hours, the largest estimated memory per GPU.
3. `moe.sweeps.memory`'s estimate (fp32 activations, one process) against the measured
   peak resident memory of a process that trains pocket-tiny for a few steps.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _step_times(config: str, overrides: list[str], steps: int, out: list) -> None:
    """Every rank: time train_step; rank 0 puts the median into `out`."""
    import torch

    from moe.config import load_config
    from moe.data.shards import load_data
    from moe.train.distributed import Dist
    from moe.train.loop import _setup
    from moe.train.schedule import lr_at
    from moe.train.step import train_step

    cfg = load_config(config, ["train.num_threads=1", *overrides])
    ddp = Dist.current()
    data = load_data(cfg.data, cfg.model.seq_len)
    model, opt, par = _setup(cfg, torch.device("cpu"), ddp)
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        train_step(model, opt, data, cfg, step, lr_at(step, cfg.train, 1000),
                   torch.device("cpu"), ddp, par)
        times.append(time.perf_counter() - t0)
    if ddp.rank == 0:
        out.append(statistics.median(times[2:]))


def step_time(config: str, world: int, overrides: list[str], steps: int) -> float:
    import torch.multiprocessing as mp

    from tests.distributed import run_ranks

    if world == 1:
        out: list = []
        _step_times(config, overrides, steps, out)
        return out[0]
    manager = mp.Manager()
    out = manager.list()
    run_ranks(world, _step_times, config, overrides, steps, out)
    return out[0]


def bench_step_times(config: str, steps: int) -> None:
    print(f"1. CPU step time, {Path(config).name}, 1 thread per process "
          f"(median of {steps} steps)")
    layouts = [("1 process", 1, []), ("2 processes, DDP", 2, []),
               ("2 processes, FSDP2", 2, ["parallel.data=fsdp"]),
               ("2 processes, FSDP2 + expert 2", 2, ["parallel.data=fsdp", "parallel.expert=2"])]
    base = None
    for name, world, overrides in layouts:
        t = step_time(config, world, overrides, steps)
        base = base or t
        print(f"   {name:32s} {1000 * t:8.1f} ms/step   speed-up {base / t:4.2f}x")


def bench_paper_plan() -> None:
    from moe.sweeps.plan import plan, requeue_limit, with_estimate
    from moe.sweeps.profile import load_profile
    from moe.sweeps.spec import load_spec

    spec = load_spec(ROOT / "sweeps" / "paper.toml")
    profile = load_profile(ROOT / "slurm" / "profiles" / "h100x8.toml")
    t0 = time.perf_counter()
    runs = plan(spec, with_estimate(spec, profile.mfu, profile.gpu_peak_tflops), profile)
    plan_s = time.perf_counter() - t0
    print(f"\n2. Paper grid on {profile.gpu_mem_gib:g} GiB GPUs, {profile.gpus_per_node} per node, "
          f"at most {profile.max_nodes} nodes ({len(runs)} runs planned in {plan_s:.2f} s)")
    by_gpus = Counter(r.layout["gpus"] for r in runs)
    for gpus in sorted(by_gpus):
        group = [r for r in runs if r.layout["gpus"] == gpus]
        hours = sum(r.gpu_hours for r in group)
        wall = max(r.gpu_hours / gpus for r in group)
        mem = max(r.mem_per_gpu_gib for r in group)
        print(f"   {gpus:3d} GPUs: {len(group):2d} runs, {hours:9.0f} GPU-hours, longest "
              f"{wall:6.1f} h wall, max {mem:5.1f} GiB/GPU")
    kinds = Counter((r.layout["data"], r.layout["expert"] > 1, r.layout[
        "activation_checkpointing"]) for r in runs)
    print("   layouts: " + ", ".join(f"{d}{' +EP' if ep else ''}{' +AC' if ac else ''}: {n}"
                                     for (d, ep, ac), n in sorted(kinds.items())))
    print(f"   total {sum(r.gpu_hours for r in runs):.0f} GPU-hours; submitit requeue limit "
          f"{requeue_limit(runs, profile)} timeouts of {profile.timeout_min} min")


def _measure_peak(config: str) -> None:
    """Child process: RSS growth while building and training the model (MiB) on stdout."""
    import torch

    from moe.config import load_config
    from moe.data.shards import load_data
    from moe.train.distributed import Dist
    from moe.train.loop import _setup
    from moe.train.step import train_step

    torch.set_num_threads(1)
    cfg = load_config(config, ["train.num_threads=1"])
    data = load_data(cfg.data, cfg.model.seq_len)
    # one step first and throw it away: the code pages and thread pools it touches count
    # in RSS but are not training memory
    model, opt, par = _setup(cfg, torch.device("cpu"), Dist())
    train_step(model, opt, data, cfg, 0, 1e-3, torch.device("cpu"), Dist(), par)
    del model, opt, par
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so growth is visible
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    model, opt, par = _setup(cfg, torch.device("cpu"), Dist())
    for step in range(3):
        train_step(model, opt, data, cfg, step, 1e-3, torch.device("cpu"), Dist(), par)
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def bench_memory(config: str) -> None:
    from moe.config import load_config
    from moe.sweeps.memory import Layout, estimate_memory

    cfg = load_config(config)
    layout = Layout(nodes=1, gpus=1, data="ddp", fsdp=1, expert=1,
                    micro_batch=cfg.train.batch_size, grad_accum=1,
                    activation_checkpointing=False)
    est = estimate_memory(cfg, layout, act_bytes=4)
    # one process has no DDP gradient bucket: 16 of the 20 bytes per parameter
    states = est.states * 16 / 20
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--measure-peak", config], env=env,
                         capture_output=True, text=True, check=True).stdout
    measured = float(out.strip().splitlines()[-1])
    mib = 2 ** 20
    estimate = (states + est.activations) / mib
    print(f"\n3. Memory of {Path(config).name} on one CPU process (fp32), MiB")
    print(f"   estimate: states {states / mib:.1f} + activations {est.activations / mib:.1f} "
          f"= {estimate:.1f}")
    print(f"   measured peak RSS growth over 3 training steps (Linux VmHWM): {measured:.1f} "
          f"(estimate / measured = {estimate / measured:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default=str(ROOT / "configs" / "pocket-tiny.toml"))
    parser.add_argument("--measure-peak", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_peak:
        _measure_peak(args.measure_peak)
        return
    bench_step_times(args.config, args.steps)
    bench_paper_plan()
    bench_memory(args.config)


if __name__ == "__main__":
    main()

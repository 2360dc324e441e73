"""CPU training speed of pocket models: thread counts, a competing load, the matmul rate.

    python benchmarks/bench_cpu.py [--rounds 3] [--min-time 1.0] [--full-run] [-o FILE.json]

Prints two tables measured in one run, so their ratios survive a machine that other
jobs share (absolute numbers do not):

1. tokens/s of the training step (`moe.train.step.train_step`: forward, backward, clip,
   AdamW) of pocket-tiny and two pocket-science sizes at 1 thread, 2 threads and
   `train.num_threads = "auto"`, on the machine as it is ("quiet") and beside a busy loop
   on one core that this script starts; auto / best per row (the goal: <= 1.1).
   Thread settings are interleaved over `--rounds` rounds and each keeps its best round,
   so a burst of load from elsewhere does not land on one setting only. "fastest?" says
   whether auto picked the fixed setting that measured fastest: where it did, auto and that
   setting run the same steps, and their ratio is this machine's round-to-round noise.
2. achieved training GFLOP/s per thread (`moe.params.train_flops_per_token`) against an
   fp32 matmul of the model's width at the same thread count, timed in the same run:
   the micro-batch's tokens x d_model times d_model x 2*d_hidden (a dense FFN's gate/up,
   the largest matmul the width makes). The goal: >= 0.6 at d_model 64.
3. where one thread's step goes (quiet): torch's profiler over a few steps splits it into
   the GEMM kernels (`aten::mm`, `addmm`, `bmm`, `baddbmm`, `_grouped_mm`: every matmul of
   the model's layers, its router and head, forward and backward), the fused attention
   kernels (`scaled_dot_product_attention` forward and backward, where the model uses them)
   and the rest (elementwise ops, softmax, norms, optimizer, Python). "ceiling" is the
   ratio of table 2 for a step that took only its GEMM and attention time: what cutting
   every other op, by fusion or otherwise, could reach with the BLAS this machine has (an
   upper bound where the "profiled" step, the sum of every op's self time, is at least the
   unprofiled one: the profiler's own overhead then counts as rest, so the shares of GEMM
   and attention are if anything low).
4. with `--compile`: torch.compile (`train.compile = true`, `moe.train.parallel.compile_blocks`)
   against the eager step, one thread, quiet: the seconds until the compiled model's first
   three steps are done, and both step times, the two models timed in alternation in one
   process (best of six blocks of 15 steps). torch keeps compiled kernels in an on-disk cache,
   so a second run compiles in about a second: the first run's compile time is the cold one.

The process keeps freed memory on its heap as `moe train` does on CPU
(`moe.train.resources.retain_freed_memory`), so the steps timed are the loop's.

`--full-run` also times `moe train configs/pocket-tiny.toml` end to end (auto threads,
start-up included), quiet and beside the busy loop: the README's first tour command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from moe.config import load_config
from moe.data.shards import load_data
from moe.model import MoELM
from moe.params import train_flops_per_token
from moe.train import build_optimizer
from moe.train.distributed import Dist
from moe.train.resources import apply_num_threads, retain_freed_memory
from moe.train.step import train_step

ROOT = Path(__file__).resolve().parents[1]
POCKET_TINY = ROOT / "configs" / "pocket-tiny.toml"
MODELS = {  # name -> overrides of pocket-tiny
    "pocket-tiny d64 E8 k2": [],
    "science d32 E32 k1": ["model.d_model=32", "model.n_experts=32", "model.top_k=1"],
    "science d64 E16 k8": ["model.d_model=64", "model.n_experts=16", "model.top_k=8"],
}
SETTINGS = ("1", "2", "auto")


@contextmanager
def busy_loop(enabled: bool):
    """A Python busy loop pinned to this machine's last core (nothing when disabled)."""
    if not enabled:
        yield
        return
    core = max(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, "
                             f"{{{core}}})\nwhile True: pass"])
    time.sleep(0.5)  # started and spinning
    try:
        yield
    finally:
        spin.kill()
        spin.wait()


class Trainer:
    """One model and optimizer trained step after step by the training loop's own step."""

    def __init__(self, overrides: list[str]):
        self.cfg = load_config(POCKET_TINY, ["train.num_threads=auto", *overrides])
        self.data = load_data(self.cfg.data, self.cfg.model.seq_len)
        torch.manual_seed(0)
        self.model = MoELM(self.cfg.model)
        self.opt = build_optimizer(self.model, self.cfg.train)
        self.step = 0
        self.tokens_per_step = self.cfg.train.batch_size * self.cfg.model.seq_len

    def run(self, n: int) -> None:
        for _ in range(n):
            train_step(self.model, self.opt, self.data, self.cfg, self.step, 1e-3,
                       torch.device("cpu"), Dist())
            self.step += 1

    def tokens_per_s(self, setting: str, min_time_s: float) -> tuple[float, int]:
        """(tokens/s over at least min_time_s of steps, threads used) at this setting."""
        if setting == "auto":
            threads = apply_num_threads(self.cfg, torch.device("cpu"))
        else:
            threads = int(setting)
            torch.set_num_threads(threads)
        self.run(1)  # the thread pool settles
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time_s or n < 3:
            self.run(1)
            n += 1
        return n * self.tokens_per_step / (time.perf_counter() - t0), threads


def matmul_gflops(cfg, threads: int, min_time_s: float = 0.3) -> float:
    """fp32 GFLOP/s of tokens x D @ D x 2H at this thread count (best of three timings)."""
    torch.set_num_threads(threads)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    a, b = torch.randn(tokens, cfg.model.d_model), torch.randn(cfg.model.d_model,
                                                               2 * cfg.model.d_hidden)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time_s / 3:
            a @ b
            n += 1
        best = max(best, n * 2 * a.shape[0] * a.shape[1] * b.shape[1]
                   / (time.perf_counter() - t0) / 1e9)
    return best


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")
"""The profiler's names of torch's matmul kernels (self time: `_grouped_mm` loops over its
groups with `aten::mm`, which is counted as mm)."""
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def step_breakdown(trainer: Trainer, steps: int = 10) -> dict:
    """Milliseconds per step (one thread) in GEMM kernels and in fused attention kernels,
    by the self time torch's profiler gives each op over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    trainer.run(2)  # warm at this thread count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.run(steps)
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    if not any(op in self_ms for op in GEMM_OPS):
        raise SystemExit(f"bench_cpu: the profiler saw none of {GEMM_OPS} in a training step; "
                         "torch renamed its matmul ops: update GEMM_OPS")
    return {"gemm_ms": sum(self_ms.get(op, 0.0) for op in GEMM_OPS),
            "attention_ms": sum(self_ms.get(op, 0.0) for op in ATTENTION_OPS),
            "profiled_step_ms": sum(self_ms.values())}


def compile_vs_eager(overrides: list[str], rounds: int = 6, steps: int = 15) -> dict:
    """Compile seconds and best eager and compiled ms per step, one thread, alternating."""
    from moe.train.parallel import compile_blocks

    torch.set_num_threads(1)
    eager = Trainer([*overrides, "train.compile=false"])
    compiled = Trainer([*overrides, "train.compile=true"])
    compile_blocks(compiled.model)
    t0 = time.perf_counter()
    try:
        compiled.run(3)
    except Exception as e:  # inductor on CPU builds C++: no compiler, no compiled step
        raise SystemExit(f"bench_cpu --compile: torch.compile failed on CPU (it needs a C++ "
                         f"compiler): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    compile_s = time.perf_counter() - t0
    eager.run(3)
    best = {"eager_ms": float("inf"), "compiled_ms": float("inf")}
    for _ in range(rounds):
        for key, trainer in (("eager_ms", eager), ("compiled_ms", compiled)):
            t0 = time.perf_counter()
            trainer.run(steps)
            best[key] = min(best[key], 1e3 * (time.perf_counter() - t0) / steps)
    return {"compile_s": compile_s, **best}


def measure_row(trainer: Trainer, loaded: bool, rounds: int, min_time_s: float) -> dict:
    """Best tokens/s of each thread setting over interleaved rounds, with or without load."""
    best = dict.fromkeys(SETTINGS, 0.0)
    auto_threads = set()
    with busy_loop(loaded):
        trainer.run(2)  # warm-up
        for _ in range(rounds):
            for setting in SETTINGS:
                tps, threads = trainer.tokens_per_s(setting, min_time_s)
                best[setting] = max(best[setting], tps)
                if setting == "auto":
                    auto_threads.add(threads)
        flops = train_flops_per_token(trainer.cfg.model)
        mm = {t: matmul_gflops(trainer.cfg, t) for t in (1, 2)}
        parts = None if loaded else step_breakdown(trainer)
    top = max(best["1"], best["2"])
    fastest = "1" if best["1"] >= best["2"] else "2"
    row = {"tokens_per_s": best, "auto_threads": sorted(auto_threads),
           "auto_over_best": top / best["auto"],
           "auto_picked_fastest": auto_threads == {int(fastest)},
           "gflops_per_thread": {s: best[s] * flops / 1e9 / (2 if s == "2" else 1)
                                 for s in ("1", "2")},
           "matmul_gflops_per_thread": {str(t): g / t for t, g in mm.items()}}
    if parts:
        row.update(parts, step_ms_1_thread=1e3 * trainer.tokens_per_step / best["1"])
    return row


def full_run_s(loaded: bool) -> float:
    """Wall seconds of `moe train configs/pocket-tiny.toml` (auto threads), start-up included."""
    with busy_loop(loaded), tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moe", "train", str(POCKET_TINY), "--out",
                        str(Path(tmp) / "run")], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        return time.perf_counter() - t0


def print_tables(rows: dict, full: dict, compiled: dict) -> None:
    print(f"{'model':24s} {'load':6s} {'1 thread':>9s} {'2 threads':>9s} {'auto':>9s} "
          f"{'auto=':>5s} {'auto/best':>9s} {'fastest?':>8s}   (tokens/s, best of rounds)")
    for (name, load), r in rows.items():
        t = r["tokens_per_s"]
        print(f"{name:24s} {load:6s} {t['1']:9.0f} {t['2']:9.0f} {t['auto']:9.0f} "
              f"{','.join(map(str, r['auto_threads'])):>5s} {r['auto_over_best']:9.2f} "
              f"{'yes' if r['auto_picked_fastest'] else 'no':>8s}")
    print()
    print(f"{'model':24s} {'load':6s} {'thr':>3s} {'GFLOP/s/thr':>11s} {'matmul/thr':>10s} "
          f"{'ratio':>6s}   (training FLOPs vs fp32 tokens x D @ D x 2H)")
    for (name, load), r in rows.items():
        for s in ("1", "2"):
            g, m = r["gflops_per_thread"][s], r["matmul_gflops_per_thread"][s]
            print(f"{name:24s} {load:6s} {s:>3s} {g:11.1f} {m:10.1f} {g / m:6.2f}")
    print()
    print(f"{'model':24s} {'thr':>3s} {'step ms':>8s} {'profiled':>8s} {'GEMM':>6s} "
          f"{'attn':>6s} {'rest':>6s} {'ratio':>6s} {'ceiling':>7s}   (quiet; shares of the "
          "profiled step)")
    for (name, _load), r in rows.items():
        if "gemm_ms" not in r:
            continue
        gemm, attn = (r[k] / r["profiled_step_ms"] for k in ("gemm_ms", "attention_ms"))
        ratio = r["gflops_per_thread"]["1"] / r["matmul_gflops_per_thread"]["1"]
        print(f"{name:24s} {1:3d} {r['step_ms_1_thread']:8.1f} {r['profiled_step_ms']:8.1f} "
              f"{gemm:6.0%} {attn:6.0%} {1 - gemm - attn:6.0%} {ratio:6.2f} "
              f"{ratio / (gemm + attn):7.2f}")
    if compiled:
        print(f"\n{'model':24s} {'compile s':>9s} {'eager ms':>9s} {'compiled':>9s} "
              f"{'ratio':>6s}   (one thread, quiet; compile s: until 3 compiled steps are done)")
    for name, c in compiled.items():
        print(f"{name:24s} {c['compile_s']:9.1f} {c['eager_ms']:9.1f} {c['compiled_ms']:9.1f} "
              f"{c['compiled_ms'] / c['eager_ms']:6.2f}")
    for load, seconds in full.items():
        print(f"\nmoe train configs/pocket-tiny.toml ({load}, auto threads): {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds of steps per measurement")
    parser.add_argument("--full-run", action="store_true",
                        help="also time `moe train configs/pocket-tiny.toml` end to end")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile against the eager step (table 4)")
    parser.add_argument("-o", "--out", help="also write the numbers as JSON here")
    args = parser.parse_args()
    retain_freed_memory()  # as the training loop does on CPU
    load = os.getloadavg()
    print(f"# torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; 'busy' = a busy loop on one core")
    rows = {}
    for name, overrides in MODELS.items():
        trainer = Trainer(overrides)
        for loaded in (False, True):
            rows[(name, "busy" if loaded else "quiet")] = measure_row(
                trainer, loaded, args.rounds, args.min_time)
    full = {("busy" if loaded else "quiet"): full_run_s(loaded)
            for loaded in (False, True)} if args.full_run else {}
    compiled = {name: compile_vs_eager(overrides)
                for name, overrides in MODELS.items()} if args.compile else {}
    print_tables(rows, full, compiled)
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"rows": [{"model": n, "load": lo, **r} for (n, lo), r in rows.items()],
             "full_run_s": full, "compile": compiled}, indent=1))


if __name__ == "__main__":
    main()

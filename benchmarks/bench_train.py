"""CPU training throughput of pocket-tiny: each expert backend vs the equal-active dense model.

    python benchmarks/bench_train.py [--steps 30] [--threads 2] [--config configs/pocket-tiny.toml]

The dense baseline has one expert of hidden width k*H, so its active parameters
equal the MoE's (the MoE adds only its D*E router). Every row times the same
optimizer step on the same batches; the step time is
the median over `--steps` steps after warm-up. Each step is the one `moe train` runs
(`moe.train.step.optimizer_step`: the training loss with the step's load-balance term,
grad clip, AdamW). The goal: MoE step time at most 1.5x the dense model's with the
`torch` backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moe.config import load_config
from moe.data.shards import load_data
from moe.model import MoELM
from moe.params import count_params
from moe.train import build_optimizer, optimizer_step

ROOT = Path(__file__).resolve().parents[1]


def time_steps(model, opt, cfg, batches, warmup: int) -> list[float]:
    """Seconds of each step after `warmup`: the step `moe train` runs (`optimizer_step`)."""
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        optimizer_step(model, opt, lambda _micro, b=batch: b, 1, cfg, torch.device("cpu"))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _model_and_opt(cfg):
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    return model, build_optimizer(model, cfg.train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "pocket-tiny.toml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("-o", "--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    m = cfg.model
    data = load_data(cfg.data, m.seq_len)
    batches = [data.train.batch(0, i, cfg.train.batch_size)
               for i in range(args.steps + args.warmup)]
    dense = dataclasses.replace(m, n_experts=1, top_k=1, ffn_mult=m.ffn_mult * m.top_k)
    rows = [("dense (equal active)", dense)] + [
        (f"moe E={m.n_experts} k={m.top_k} [{b}]", dataclasses.replace(m, experts_backend=b))
        for b in ("loop", "torch")]
    tokens = cfg.train.batch_size * m.seq_len
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, batch {cfg.train.batch_size} x {m.seq_len} tokens")
    print(f"{'model':34s} {'active':>9s} {'total':>9s} {'ms/step':>9s} {'tokens/s':>10s} "
          f"{'vs dense':>8s}")
    results, base = [], None
    for name, mc in rows:
        counts = count_params(mc)
        run_cfg = dataclasses.replace(cfg, model=mc)
        model, opt = _model_and_opt(run_cfg)
        ms = 1e3 * statistics.median(time_steps(model, opt, run_cfg, batches, args.warmup))
        base = base or ms
        results.append({"model": name, "active": counts.active, "total": counts.total,
                        "ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3,
                        "ratio_vs_dense": ms / base})
        print(f"{name:34s} {counts.active:9d} {counts.total:9d} {ms:9.2f} "
              f"{tokens / ms * 1e3:10.0f} {ms / base:8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

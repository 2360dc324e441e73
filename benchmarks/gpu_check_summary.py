"""The summary table of `benchmarks/gpu_check.sh OUT_DIR` (markdown on stdout).

    python benchmarks/gpu_check_summary.py OUT_DIR > OUT_DIR/summary.md

Reads what the check wrote: steps.tsv (status and seconds of every step),
environment.txt, bench_kernels.json (`moe bench kernels`), train_*.json
(`moe bench train`). A missing file is reported as missing, not an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KERNEL_BACKENDS = ("triton", "torch", "megablocks", "dense")


def _fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def steps_table(out: Path) -> list[str]:
    path = out / "steps.tsv"
    if not path.exists():
        return ["(steps.tsv missing)"]
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return ["| step | status | seconds |", "|---|---|---|",
            *(f"| {name} | {status} | {secs} |" for name, status, secs in rows)]


def kernels_table(out: Path) -> list[str]:
    """One row per shape: fwd and fwd+bwd TFLOP/s of each backend, triton / dense."""
    path = out / "bench_kernels.json"
    if not path.exists():
        return ["(bench_kernels.json missing: see bench_kernels.log)"]
    report = json.loads(path.read_text())
    by_shape: dict[tuple, dict[str, dict]] = {}
    for r in report["results"]:
        key = (r["d_model"], r["n_experts"], r["top_k"], r["n_tokens"])
        by_shape.setdefault(key, {})[r["backend"]] = r
    head = "| D | E | k | T | " + " | ".join(
        f"{b} fwd | {b} fwd+bwd" for b in KERNEL_BACKENDS) + " | triton/dense fwd+bwd |"
    lines = [f"Expert layer TFLOP/s on {report['environment']['device']} "
             f"({report['environment']['dtype']})", "", head,
             "|" + "---|" * (5 + 2 * len(KERNEL_BACKENDS))]
    for (d, e, k, t), rows in by_shape.items():
        cells = []
        for b in KERNEL_BACKENDS:
            r = rows.get(b, {})
            cells += [_fmt(r.get("fwd_tflops"), ".2f"), _fmt(r.get("fwdbwd_tflops"), ".2f")]
        tri, dense = rows.get("triton", {}), rows.get("dense", {})
        ratio = (tri["fwdbwd_tflops"] / dense["fwdbwd_tflops"]
                 if tri.get("fwdbwd_tflops") and dense.get("fwdbwd_tflops") else None)
        lines.append(f"| {d} | {e} | {k} | {t} | " + " | ".join(cells)
                     + f" | {_fmt(ratio, '.2f')} |")
    not_run = {(r["backend"], r.get("skipped") or r.get("error")) for r in report["results"]
               if "fwd_tflops" not in r}
    lines += [f"- not run: `{b}`: {why}" for b, why in sorted(not_run)]
    return lines


def train_table(out: Path) -> list[str]:
    lines = ["| config | backend | micro-batch | steps | tokens/s | TFLOP/s | MFU "
             "| peak memory GiB | final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("train_*.json")):
        r = json.loads(path.read_text())
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {Path(r['config']).name} | {r['experts_backend']} "
                     f"| {r['micro_batch']}x{r['seq_len']} | {r['steps']} "
                     f"| {r['tokens_per_s']:.0f} | {r['tflops']:.2f} | {mfu} "
                     f"| {_fmt(r['peak_memory_gb'], '.2f')} | {r['final_loss']:.3f} |")
    return lines


def summary(out: Path) -> str:
    env = out / "environment.txt"
    parts = ["# GPU check", "", env.read_text().strip() if env.exists() else "", "",
             "## Steps", "", *steps_table(out), "", "## Expert layer (moe bench kernels)", "",
             *kernels_table(out), "", "## Training (moe bench train, generated tokens)", "",
             *train_table(out)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/gpu_check_summary.py OUT_DIR (a gpu_check.sh output)")
    print(summary(Path(sys.argv[1])), end="")

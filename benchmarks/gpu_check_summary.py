"""The summary of `benchmarks/gpu_check.sh` (markdown on stdout), and its environment record.

    python benchmarks/gpu_check_summary.py WORK_DIR > summary.md
    python benchmarks/gpu_check_summary.py --environment FILE

Reads what the check's steps wrote so far: steps.tsv (status, seconds and cap of every
step), environment.txt, bench_kernels.jsonl (`moe bench kernels --jsonl`, one record a
line), gpu_tests.xml (pytest's JUnit XML), train_*.json (`moe bench train`). The check
calls it after every step, so a file not written yet is reported as missing, not an error.
Kernel results are same-run ratios (`moe.kernels.bench.ratios`, written by the benchmark
once a shape is complete): Triton's TFLOP/s over torch grouped_mm's and over the
equal-FLOP dense SwiGLU's, > 1 when Triton is faster. Reading needs no torch (it runs
after every step, inside a few seconds).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def environment() -> str:
    import platform

    import torch

    lines = [f"python {platform.python_version()} | torch {torch.__version__} | "
             f"cuda {torch.version.cuda}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"gpu {p.name} | sm_{p.major}{p.minor} | {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("no CUDA device")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    return "\n".join(lines) + "\n"


def steps_table(work: Path) -> list[str]:
    path = work / "steps.tsv"
    if not path.exists():
        return ["(steps.tsv missing)"]
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return ["| step | status | seconds | cap |", "|---|---|---|---|",
            *(f"| {' | '.join(row)} |" for row in rows)]


def kernel_records(work: Path) -> tuple[list[dict], list[dict]]:
    """(backend records, per-shape ratio rows) from bench_kernels.jsonl."""
    path = work / "bench_kernels.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if "backend" in r], [r["ratios"] for r in rows if "ratios" in r]


def kernels_table(work: Path) -> list[str]:
    """Same-run ratios per shape, then each backend's TFLOP/s."""
    records, ratio_rows = kernel_records(work)
    if not records:
        return ["(no kernel results: see logs/bench_kernels.log)"]
    lines = []
    if ratio_rows:
        cols = [c for c in ratio_rows[0] if "/" in c]
        lines += ["| D | E | k | T | " + " | ".join(cols) + " |",
                  "|" + "---|" * (4 + len(cols))]
        lines += [f"| {r['d_model']} | {r['n_experts']} | {r['top_k']} | {r['n_tokens']} | "
                  + " | ".join(_fmt(r[c], ".2f") for c in cols) + " |" for r in ratio_rows]
    lines += ["", "| D | E | k | backend | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd ms |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        if "fwd_tflops" in r:
            lines.append(f"| {r['d_model']} | {r['n_experts']} | {r['top_k']} | {r['backend']} "
                         f"| {r['fwd_tflops']:.4g} | {r['fwdbwd_tflops']:.4g} "
                         f"| {r['fwdbwd_ms']:.3f} |")
    not_run = {(r["backend"], r.get("skipped") or r.get("error")) for r in records
               if "fwd_tflops" not in r}
    lines += [f"- not run: `{b}`: {why}" for b, why in sorted(not_run)]
    return lines


def train_table(work: Path) -> list[str]:
    lines = ["| config | backend | compiled | micro-batch | steps | tokens/s | TFLOP/s | MFU "
             "| peak memory GiB | final loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(work.glob("train_*.json")):
        r = json.loads(path.read_text())
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {Path(r['config']).name} | {r['experts_backend']} "
                     f"| {r.get('compiled', 'n/a')} | {r['micro_batch']}x{r['seq_len']} "
                     f"| {r['steps']} | {r['tokens_per_s']:.0f} | {r['tflops']:.2f} | {mfu} "
                     f"| {_fmt(r['peak_memory_gb'], '.2f')} | {r['final_loss']:.3f} |")
    return lines


def gpu_tests_table(work: Path) -> list[str]:
    """Each gpu test's outcome from pytest's JUnit XML (tests deselected by -m are absent)."""
    path = work / "gpu_tests.xml"
    if not path.exists():
        return ["(gpu_tests.xml missing: see logs/gpu_tests.log)"]
    lines = ["| test | outcome |", "|---|---|"]
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                message = (found.get("message") or "").splitlines()[0][:120] if \
                    found.get("message") else ""
                outcome = f"{tag}: {message}".rstrip(": ").replace("|", "/")
        lines.append(f"| {case.get('classname', '').split('.')[-1]}::{case.get('name')} "
                     f"| {outcome} |")
    return lines


def summary(work: Path) -> str:
    env = work / "environment.txt"
    parts = ["# GPU check", "", env.read_text().strip() if env.exists() else "", "",
             "## Steps", "", *steps_table(work), "",
             "## Expert layer (moe bench kernels): same-run ratios of TFLOP/s", "",
             *kernels_table(work), "", "## Training (moe bench train, generated tokens)", "",
             *train_table(work), "", "## gpu tests", "", *gpu_tests_table(work)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--environment":
        Path(sys.argv[2]).write_text(environment())
        print(environment(), end="")
    elif len(sys.argv) == 2 and Path(sys.argv[1]).is_dir():
        print(summary(Path(sys.argv[1])), end="")
    else:
        sys.exit("usage: python benchmarks/gpu_check_summary.py WORK_DIR | --environment FILE")

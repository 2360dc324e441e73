"""`moe bench kernels`: time the SwiGLU expert layer on every available backend.

The benchmark itself lives in `moe.kernels.bench` (shapes, timing, same-run ratios, the
report); this module parses the command line, hands the benchmark the model's expert
layer (`moe.model.experts`) and writes what it measures: each record as one JSON line the
moment it is measured (`--jsonl`), the whole report as JSON and markdown at the end (`-o`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe.errors import BadInput
from moe.kernels.bench import (
    BACKENDS,
    DTYPES,
    PAPER_TOKENS,
    ExpertOps,
    paper_shapes,
    ratios,
    run_benchmark,
    small_shapes,
    to_markdown,
)


class BenchError(BadInput):
    """Bad `moe bench` arguments (one-line message)."""


def expert_ops() -> ExpertOps:
    """The model's dispatch, backends and combine, for the kernels-layer benchmark."""
    from moe.model.experts import combine, get_backend, make_dispatch_plan

    return ExpertOps(make_plan=make_dispatch_plan, backend=get_backend, combine=combine)


def _parse_backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise BenchError(f"unknown backend(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(BACKENDS)}")
    return names


def _handle_kernels(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes_name = args.shapes or ("paper" if device.type == "cuda" else "small")
    shapes = paper_shapes(args.tokens or PAPER_TOKENS) if shapes_name == "paper" \
        else small_shapes()
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    if repeats < 1 or args.warmup < 0 or (args.tokens is not None and args.tokens < 1):
        raise BenchError("--repeats and --tokens must be >= 1, --warmup >= 0")
    backends = _parse_backends(args.backends)
    lines = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115 - open while it runs

    shape_records: list[dict] = []

    def on_record(record: dict) -> None:
        outcome = (f"{record['fwdbwd_ms']} ms fwd+bwd" if "fwdbwd_ms" in record
                   else record.get("skipped") or record.get("error"))
        print(f"d={record['d_model']} E={record['n_experts']} k={record['top_k']} "
              f"{record['backend']}: {outcome}", flush=True)
        shape_records.append(record)
        done = [record] if len(shape_records) < len(backends) else \
            [record, {"ratios": ratios(shape_records)[0]}]  # the shape is complete
        if len(done) == 2:
            shape_records.clear()
        if lines is not None:
            lines.write("".join(json.dumps(r) + "\n" for r in done))
            lines.flush()

    try:
        report = run_benchmark(expert_ops(), shapes, backends, device=device, dtype=dtype,
                               warmup=args.warmup, repeats=repeats, on_record=on_record)
    finally:
        if lines is not None:
            lines.close()
    report["ratios"] = ratios(report["results"])
    table = to_markdown(report)
    print(table, end="")
    if args.out is not None:
        from moe.io import atomic_write_json, atomic_write_text

        out = Path(args.out)
        atomic_write_json(out, report)
        atomic_write_text(out.with_suffix(".md"), table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def register(subparsers) -> None:
    """Add `bench kernels` to an argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    p = bench_sub.add_parser(
        "kernels", help="time the expert layer (fwd, bwd, fwd+bwd) on every backend",
        description="Median ms and TFLOP/s of the SwiGLU expert layer's forward, backward and "
                    "forward+backward on each backend, plus a dense matmul of the same FLOPs. "
                    "CUDA: the paper's shapes, CUDA-event timing. CPU: small shapes, "
                    "perf_counter timing; GPU-only backends are listed with the reason.")
    p.add_argument("-o", "--out", help="write the results as JSON here (and a .md table beside)")
    p.add_argument("--jsonl", help="append each result to this file as one JSON line the "
                                   "moment it is measured, and each shape's same-run ratios "
                                   "({\"ratios\": ...}) once it is complete")
    p.add_argument("--shapes", choices=("paper", "small"),
                   help="paper: the 12 paper shapes at 16k tokens (default on CUDA); "
                        "small: two tiny shapes (default on CPU)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tokens", type=int, help=f"tokens per batch for --shapes paper "
                                              f"(default {PAPER_TOKENS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--repeats", type=int, help="timed calls; median reported (20 CUDA, 3 CPU)")
    p.set_defaults(func=_handle_kernels)
    from moe.app import bench_train

    bench_train.register(bench_sub)

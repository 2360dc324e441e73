"""`moe bench kernels`: time the SwiGLU expert layer on every available backend.

Shape legend: T tokens, D model width, H = 2*D expert hidden width, E experts,
K experts per token, S = T*K routed token-slots.

For each shape (paper: D in {512, 1024, 2048} x (E, K) in {(8, 2), (16, 4),
(64, 8), (128, 16)}, T = 16384) and backend (`loop`, `torch`, `triton`,
`megablocks`, and `dense`: a dense SwiGLU over the S slot rows, the same FLOPs
without routing, i.e. the cuBLAS ceiling) it reports the median milliseconds
and TFLOP/s of the forward, the backward and forward+backward. The forward
does 3 matmuls of 2*S*D*H FLOPs; the backward twice that. The routing plan is
built once per shape, outside the timed region. CUDA: CUDA events after
warm-up (the warm-up also runs Triton's autotuning). CPU: time.perf_counter on
small shapes; backends that need a GPU
are listed with the reason they were skipped.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.config import EXPERT_BACKENDS
from moe.errors import BadInput

BACKENDS = (*(b for b in EXPERT_BACKENDS if b != "auto"), "dense")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAPER_TOKENS = 16384


class BenchError(BadInput):
    """Bad `moe bench` arguments (one-line message)."""


@dataclass(frozen=True, kw_only=True)
class BenchShape:
    d_model: int
    """Model width D; the expert hidden width is 2*D (the paper's SwiGLU experts)."""
    n_experts: int
    """Experts E."""
    top_k: int
    """Experts per token K."""
    n_tokens: int
    """Tokens T per batch."""

    @property
    def d_hidden(self) -> int:
        return 2 * self.d_model

    @property
    def fwd_flops(self) -> int:
        return 3 * 2 * self.n_tokens * self.top_k * self.d_model * self.d_hidden


PAPER_EXPERTS = ((8, 2), (16, 4), (64, 8), (128, 16))
"""(E, k) pairs spanning the paper's grid (its configs: E8-k2, E16-k4, E128-k16)."""


def paper_shapes(n_tokens: int = PAPER_TOKENS) -> list[BenchShape]:
    return [BenchShape(d_model=d, n_experts=e, top_k=k, n_tokens=n_tokens)
            for d in (512, 1024, 2048) for e, k in PAPER_EXPERTS]


def small_shapes() -> list[BenchShape]:
    """Finishes in well under a minute on two CPU cores."""
    return [BenchShape(d_model=64, n_experts=8, top_k=2, n_tokens=1024),
            BenchShape(d_model=128, n_experts=32, top_k=4, n_tokens=512)]


def skip_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    on_cuda = device.type == "cuda"
    if backend == "torch" and getattr(F, "grouped_mm", None) is None \
            and getattr(torch, "_grouped_mm", None) is None:
        return f"torch {torch.__version__} has no grouped_mm"
    if backend == "triton":
        if not on_cuda:
            return ("no CUDA: Triton kernels need a GPU (the CPU interpreter checks "
                    "correctness, its speed means nothing)")
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    if backend == "megablocks":
        if not on_cuda:
            return "no CUDA: MegaBlocks builds CUDA kernels and cannot run on CPU"
        missing = [m for m in ("megablocks", "grouped_gemm") if importlib.util.find_spec(m) is None]
        if missing:
            return f"not installed: pip install {' '.join(missing)}"
    return None


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def _time_once_ms(run: Callable[[object], None], state: object, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    run(state)
    return (time.perf_counter() - t0) * 1e3


def median_ms(run: Callable[[object], None], setup: Callable[[], object], *,
              device: torch.device, warmup: int, repeats: int) -> float:
    """Median over `repeats` of run(setup()), timing only `run`, after `warmup` calls."""
    for _ in range(warmup):
        run(setup())
    return statistics.median(_time_once_ms(run, setup(), device) for _ in range(repeats))


@dataclass
class _Case:
    """One backend on one shape: a forward closure, its leaf inputs and an output grad."""

    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    dy: torch.Tensor


def _routed_case(fn, shape: BenchShape, device, dtype, seed: int) -> _Case:
    """The expert layer as the model runs it: dispatch, backend, fp32 weighted combine."""
    from moe.model.experts import combine, make_dispatch_plan

    gen = torch.Generator(device="cpu").manual_seed(seed)
    t, d, h, e = shape.n_tokens, shape.d_model, shape.d_hidden, shape.n_experts
    logits_TE = torch.randn(t, e, generator=gen)
    top = logits_TE.topk(shape.top_k, dim=-1)
    weight_TK = top.values.softmax(-1).to(device).requires_grad_()
    plan = make_dispatch_plan(top.indices.to(device), weight_TK, e)

    def leaf(*size, scale):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    x = leaf(t, d, scale=1.0)
    ws = [leaf(e, d, 2 * h, scale=d ** -0.5), leaf(e, h, d, scale=h ** -0.5)]
    dy = torch.randn(t, d, generator=gen).to(device)  # the combine's output is fp32

    def forward():
        # make_dispatch_plan's fp32 weight is a view of the leaf: a fresh graph per call
        return combine(fn(x, plan, *ws), weight_TK.float())

    return _Case(forward, [x, weight_TK, *ws], dy)


def _dense_case(shape: BenchShape, device, dtype, seed: int) -> _Case:
    """A dense SwiGLU over the S = T*K slot rows: the routed layer's FLOPs without routing."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    s, d, h = shape.n_tokens * shape.top_k, shape.d_model, shape.d_hidden

    def leaf(*size, scale):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    x, w13, w2 = leaf(s, d, scale=1.0), leaf(d, 2 * h, scale=d ** -0.5), leaf(h, d, scale=h ** -0.5)
    dy = torch.randn(s, d, generator=gen).to(device, dtype)

    def forward():
        gate, up = (x @ w13).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2

    return _Case(forward, [x, w13, w2], dy)


def _make_case(backend: str, shape: BenchShape, device, dtype) -> _Case:
    if backend == "dense":
        return _dense_case(shape, device, dtype, seed=0)
    from moe.model.experts import get_backend

    return _routed_case(get_backend(backend, device), shape, device, dtype, seed=0)


def time_case(case: _Case, shape: BenchShape, device, *, warmup: int,
              repeats: int) -> dict[str, float]:
    """fwd, bwd and fwd+bwd milliseconds and TFLOP/s of one case."""
    def fresh():
        for t in case.leaves:
            t.grad = None

    def forward_state():
        fresh()
        return case.forward()

    timings = {
        "fwd": median_ms(lambda _: case.forward(), fresh, device=device,
                         warmup=warmup, repeats=repeats),
        "bwd": median_ms(lambda y: y.backward(case.dy), forward_state, device=device,
                         warmup=warmup, repeats=repeats),
        "fwdbwd": median_ms(lambda _: case.forward().backward(case.dy), fresh, device=device,
                            warmup=warmup, repeats=repeats),
    }
    flops = {"fwd": shape.fwd_flops, "bwd": 2 * shape.fwd_flops, "fwdbwd": 3 * shape.fwd_flops}
    out = {}
    for phase, ms in timings.items():
        out[f"{phase}_ms"] = float(f"{ms:.4g}")
        out[f"{phase}_tflops"] = float(f"{flops[phase] / (ms * 1e-3) / 1e12:.4g}")
    return out


# ---------------------------------------------------------------------------
# The whole benchmark, its report and the CLI
# ---------------------------------------------------------------------------

def _bench_one(backend: str, shape: BenchShape, device, dtype, warmup, repeats) -> dict:
    record = {"backend": backend, **dataclasses.asdict(shape), "d_hidden": shape.d_hidden}
    reason = skip_reason(backend, device)
    if reason is not None:
        return {**record, "skipped": reason}
    try:
        case = _make_case(backend, shape, device, dtype)
        return {**record, **time_case(case, shape, device, warmup=warmup, repeats=repeats)}
    except Exception as exc:  # an OOM or an unsupported dtype is a result, not a crash
        return {**record, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    try:
        triton_version = importlib.import_module("triton").__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": f"{device.type}: {name or platform.machine()}", "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "dtype": str(dtype),
            "timing": ("CUDA events, median after warm-up" if device.type == "cuda"
                       else "time.perf_counter, median after warm-up")}


def run_benchmark(shapes: list[BenchShape], backends: list[str], *, device: torch.device,
                  dtype: torch.dtype, warmup: int, repeats: int,
                  log: Callable[[str], None] = lambda _: None) -> dict:
    results = []
    for shape in shapes:
        for backend in backends:
            record = _bench_one(backend, shape, device, dtype, warmup, repeats)
            results.append(record)
            outcome = (f"{record['fwdbwd_ms']} ms fwd+bwd" if "fwdbwd_ms" in record
                       else record.get("skipped") or record.get("error"))
            log(f"d={shape.d_model} E={shape.n_experts} k={shape.top_k} {backend}: {outcome}")
    return {"environment": environment(device, dtype), "results": results}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Expert layer (SwiGLU, H = 2D) on {env['device']}; torch {env['torch']}, "
             f"triton {env['triton']}, {env['dtype']}; {env['timing']}.", "",
             "| D | E | k | T | backend | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s "
             "| fwd+bwd ms | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = {}
    for r in report["results"]:
        if "fwd_ms" not in r:
            notes.setdefault((r["backend"], r.get("skipped") or r.get("error")), []).append(r)
            continue
        lines.append(f"| {r['d_model']} | {r['n_experts']} | {r['top_k']} | {r['n_tokens']} "
                     f"| {r['backend']} | " + " | ".join(
                         f"{r[f'{p}_ms']:.3f} | {r[f'{p}_tflops']:.3f}"
                         for p in ("fwd", "bwd", "fwdbwd")) + " |")
    if notes:
        lines += ["", "Not run:"]
        lines += [f"- `{backend}` ({len(rs)} shapes): {why}"
                  for (backend, why), rs in notes.items()]
    return "\n".join(lines) + "\n"


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
    report = run_benchmark(shapes, _parse_backends(args.backends), device=device, dtype=dtype,
                           warmup=args.warmup, repeats=repeats, log=print)
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

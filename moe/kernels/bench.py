"""The expert-layer benchmark behind `moe bench kernels`: shapes, timing, ratios, report.

Shape legend: T tokens, D model width, H = 2*D expert hidden width, E experts,
K experts per token, S = T*K routed token-slots.

Every backend (`loop`, `torch`, `triton`, `megablocks`) is timed as the model runs it --
dispatch plan built once per shape outside the timed region, the backend, the fp32
weighted combine -- and beside them `dense`: a dense SwiGLU over the S slot rows, the same
FLOPs without routing (the cuBLAS ceiling). Each reports the median milliseconds and
TFLOP/s of the forward, the backward and forward+backward; the forward does 3 matmuls of
2*S*D*H FLOPs, the backward twice that. Kernel results are read as ratios measured in the
same run (`ratios`): Triton / torch grouped_mm and Triton / dense, forward and
forward+backward, so the card's clocks and the run's noise cancel.

Inputs and weights are drawn on the device (a paper shape's weights are gigabytes; drawn
on the host they took minutes). Records are handed to `on_record` as soon as each is
measured, so a caller that writes them at once keeps every finished shape when the run is
stopped. CUDA: CUDA events after warm-up (the warm-up also runs Triton's autotuning).
CPU: time.perf_counter on small shapes; backends that need a GPU are listed with the reason.

This package sits below `moe.model`, so the model's dispatch, backends and combine come in
as an `ExpertOps` (the command line passes `moe.model.experts`'s).
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

import torch
import torch.nn.functional as F

from moe.config import EXPERT_BACKENDS

BACKENDS = (*(b for b in EXPERT_BACKENDS if b != "auto"), "dense")
"""The experts backends (`moe.config.EXPERT_BACKENDS`) and the equal-active dense FFN."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAPER_TOKENS = 16384


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


PAPER_CONFIGS = ((512, 8, 2), (1024, 16, 4), (2048, 128, 16))
"""(D, E, k) of the paper's configs (configs/paper/): measured first."""
PAPER_EXPERTS = ((8, 2), (16, 4), (64, 8), (128, 16))
"""(E, k) pairs spanning the paper's grid."""


def paper_shapes(n_tokens: int = PAPER_TOKENS) -> list[BenchShape]:
    """The 12 grid shapes, the paper's own configs first (a stopped run keeps those)."""
    grid = [(d, e, k) for d in (512, 1024, 2048) for e, k in PAPER_EXPERTS]
    ordered = [*PAPER_CONFIGS, *(g for g in grid if g not in PAPER_CONFIGS)]
    return [BenchShape(d_model=d, n_experts=e, top_k=k, n_tokens=n_tokens)
            for d, e, k in ordered]


def small_shapes() -> list[BenchShape]:
    """Finishes in well under a minute on two CPU cores."""
    return [BenchShape(d_model=64, n_experts=8, top_k=2, n_tokens=1024),
            BenchShape(d_model=128, n_experts=32, top_k=4, n_tokens=512)]


@dataclass(frozen=True, kw_only=True)
class ExpertOps:
    """The model's expert layer, in pieces (`moe.model.experts`)."""

    make_plan: Callable
    """make_plan(expert_idx_TK, weight_TK, n_experts) -> dispatch plan."""
    backend: Callable[[str, torch.device], Callable]
    """backend(name, device) -> fn(x_TD, plan, w13_ED2H, w2_EHD) -> y_SD."""
    combine: Callable
    """combine(y_SD, weight_TK) -> fp32 [T, D]."""


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


class _Draw:
    """Normal samples drawn on the device from one seeded generator."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, *size: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        out = torch.randn(*size, generator=self.gen, device=self.device, dtype=dtype)
        return out.mul_(scale)

    def leaf(self, *size: int, scale: float, dtype) -> torch.Tensor:
        return self.normal(*size, scale=scale, dtype=dtype).requires_grad_()


def _routed_case(ops: ExpertOps, fn, shape: BenchShape, device, dtype, seed: int) -> _Case:
    """The expert layer as the model runs it: dispatch, backend, fp32 weighted combine."""
    draw = _Draw(device, seed)
    t, d, h, e = shape.n_tokens, shape.d_model, shape.d_hidden, shape.n_experts
    top = draw.normal(t, e).topk(shape.top_k, dim=-1)
    weight_TK = top.values.softmax(-1).requires_grad_()
    plan = ops.make_plan(top.indices, weight_TK, e)
    x = draw.leaf(t, d, scale=1.0, dtype=dtype)
    ws = [draw.leaf(e, d, 2 * h, scale=d ** -0.5, dtype=dtype),
          draw.leaf(e, h, d, scale=h ** -0.5, dtype=dtype)]
    dy = draw.normal(t, d)  # the combine's output is fp32

    def forward():
        # the plan's fp32 weight is a view of the leaf: a fresh graph per call
        return ops.combine(fn(x, plan, *ws), weight_TK.float())

    return _Case(forward, [x, weight_TK, *ws], dy)


def _dense_case(shape: BenchShape, device, dtype, seed: int) -> _Case:
    """A dense SwiGLU over the S = T*K slot rows: the routed layer's FLOPs without routing."""
    draw = _Draw(device, seed)
    s, d, h = shape.n_tokens * shape.top_k, shape.d_model, shape.d_hidden
    x = draw.leaf(s, d, scale=1.0, dtype=dtype)
    w13 = draw.leaf(d, 2 * h, scale=d ** -0.5, dtype=dtype)
    w2 = draw.leaf(h, d, scale=h ** -0.5, dtype=dtype)
    dy = draw.normal(s, d, dtype=dtype)

    def forward():
        gate, up = (x @ w13).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2

    return _Case(forward, [x, w13, w2], dy)


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
# The whole benchmark, its ratios and its report
# ---------------------------------------------------------------------------

def bench_one(ops: ExpertOps, backend: str, shape: BenchShape, device, dtype, *, warmup: int,
              repeats: int) -> dict:
    """One backend on one shape: a record with timings, or why it was skipped or failed."""
    record = {"backend": backend, **dataclasses.asdict(shape), "d_hidden": shape.d_hidden}
    reason = skip_reason(backend, device)
    if reason is not None:
        return {**record, "skipped": reason}
    try:
        case = (_dense_case(shape, device, dtype, seed=0) if backend == "dense" else
                _routed_case(ops, ops.backend(backend, device), shape, device, dtype, seed=0))
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


def run_benchmark(ops: ExpertOps, shapes: list[BenchShape], backends: list[str], *,
                  device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
                  on_record: Callable[[dict], None] = lambda _: None) -> dict:
    """Every backend on every shape, in order; each record goes to `on_record` at once."""
    results = []
    for shape in shapes:
        for backend in backends:
            record = bench_one(ops, backend, shape, device, dtype, warmup=warmup,
                               repeats=repeats)
            results.append(record)
            on_record(record)
    return {"environment": environment(device, dtype), "results": results}


RATIOS = (("triton", "torch"), ("triton", "dense"))
"""(numerator, denominator) backends of the same-run throughput ratios."""


def ratios(results: list[dict]) -> list[dict]:
    """Per shape: TFLOP/s of Triton over torch grouped_mm and over dense, fwd and fwd+bwd
    (> 1: Triton is faster), from records of one run; missing partners give None."""
    by_shape: dict[tuple, dict[str, dict]] = {}
    for r in results:
        key = (r["d_model"], r["n_experts"], r["top_k"], r["n_tokens"])
        by_shape.setdefault(key, {})[r["backend"]] = r
    rows = []
    for (d, e, k, t), rs in by_shape.items():
        row = {"d_model": d, "n_experts": e, "top_k": k, "n_tokens": t}
        for num, den in RATIOS:
            for phase in ("fwd", "fwdbwd"):
                a = rs.get(num, {}).get(f"{phase}_tflops")
                b = rs.get(den, {}).get(f"{phase}_tflops")
                row[f"{num}/{den} {phase}"] = round(a / b, 3) if a and b else None
        rows.append(row)
    return rows


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

"""Planning: one row per run with its size, budget, FLOPs and estimated GPU-hours.

GPU-hours = train FLOPs / (mfu * gpu_peak_tflops * 1e12) / 3600, with mfu and
peak from the spec's [estimate] unless a cluster profile gives its own.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, fields, replace

from moe.config import RunConfig, config_hash
from moe.params import count_params, format_count, resolve_tokens, train_flops_per_token
from moe.sweeps.memory import parallel_section, plan_layout
from moe.sweeps.profile import ClusterProfile
from moe.sweeps.spec import Estimate, SpecError, SweepSpec, expand

FORMATS = ("table", "csv", "json")


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """One planned run: its id, size, budget and cost."""

    run_id: str
    """Content hash of the resolved config (`moe.config.config_hash`)."""
    d_model: int
    n_layers: int
    n_experts: int
    top_k: int
    sparsity: float
    """1 - top_k / n_experts (`moe.config.sparsity`)."""
    n_params_total: int
    n_params_active: int
    n_params_embedding: int
    tokens: int
    """Training tokens: train.tokens, or round(tpp * n_params_total)."""
    tpp: float
    """Tokens per total parameter actually trained."""
    flops: float
    """Training FLOPs: train_flops_per_token * tokens."""
    gpu_hours: float
    """Estimated GPU-hours at the stated MFU and GPU peak."""
    config: RunConfig
    """The resolved run config (written to runs/<run_id>/config.toml)."""
    layout: dict | None = None
    """With a cluster profile that gives gpu_mem_gib: nodes, gpus, data, fsdp, expert,
    micro_batch, grad_accum, activation_checkpointing (`moe.sweeps.memory.Layout`)."""
    mem_per_gpu_gib: float | None = None
    """Estimated peak memory per GPU of that layout (`moe.sweeps.memory`)."""

    def row(self) -> dict:
        """The plan row without the config (for tables, CSV and JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}


def plan(spec: SweepSpec, estimate: Estimate | None = None,
         profile: ClusterProfile | None = None) -> list[RunPlan]:
    """Expand and validate the spec; apply the GPU-hour filters; return the runs in order.

    `estimate` (from a cluster profile) replaces the spec's [estimate] when given. A
    `profile` with gpu_mem_gib gives every run a layout that fits (its [parallel] section
    is set accordingly); a run that fits on no layout is an error naming it.
    """
    estimate = estimate or spec.estimate
    runs = [plan_run(cfg, estimate) for cfg in expand(spec).configs]
    if profile is not None and profile.gpu_mem_gib and profile.gpus_per_node:
        runs = [with_layout(r, profile) for r in runs]
    cap = spec.filters.max_run_gpu_hours
    if cap is not None:
        runs = [r for r in runs if r.gpu_hours <= cap]
        if not runs:
            raise SpecError(f"every run is estimated above filters.max_run_gpu_hours={cap}")
    total = sum(r.gpu_hours for r in runs)
    limit = spec.filters.max_total_gpu_hours
    if limit is not None and total > limit:
        raise SpecError(f"the sweep is estimated at {total:.4g} GPU-hours, above "
                        f"filters.max_total_gpu_hours={limit}; shrink the grid or raise the cap")
    return runs


def plan_run(cfg: RunConfig, estimate: Estimate) -> RunPlan:
    """Size and cost of one resolved run config."""
    counts = count_params(cfg.model)
    tokens = resolve_tokens(cfg)
    flops = train_flops_per_token(cfg.model) * tokens
    gpu_hours = flops / (estimate.mfu * estimate.gpu_peak_tflops * 1e12) / 3600.0
    m = cfg.model
    return RunPlan(run_id=config_hash(cfg), d_model=m.d_model, n_layers=m.n_layers,
                   n_experts=m.n_experts, top_k=m.top_k, sparsity=m.sparsity,
                   n_params_total=counts.total, n_params_active=counts.active,
                   n_params_embedding=counts.embedding, tokens=tokens,
                   tpp=tokens / counts.total, flops=flops, gpu_hours=gpu_hours, config=cfg)


def with_layout(run: RunPlan, profile: ClusterProfile) -> RunPlan:
    """`run` with the first layout on the profile's nodes that fits its GPUs' memory."""
    lo, hi = profile.node_range
    m = run.config.model
    try:
        layout, mem = plan_layout(run.config, gpus_per_node=profile.gpus_per_node,
                                  gpu_mem_gib=profile.gpu_mem_gib, min_nodes=lo, max_nodes=hi,
                                  run_name=f"{run.run_id} (d{m.d_model}-E{m.n_experts}-k{m.top_k})")
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    parallel = replace(run.config.parallel, **parallel_section(layout))
    return replace(run, config=run.config.replace(parallel=parallel), layout=layout.as_dict(),
                   mem_per_gpu_gib=round(mem.total_gib, 2))


def requeue_limit(runs: list[RunPlan], profile: ClusterProfile) -> int:
    """Timeouts submitit may requeue after: twice the attempts the longest run needs, + 10.

    A run needs ceil(wall-clock minutes / timeout_min) attempts, its wall clock being its
    GPU-hours over its GPUs (the planned layout's, else the profile's nodes x GPUs).
    """
    def wall_min(run: RunPlan) -> float:
        gpus = run.layout["gpus"] if run.layout else max(1, profile.nodes * profile.gpus_per_node)
        return 60.0 * run.gpu_hours / gpus

    longest = max((wall_min(r) for r in runs), default=0.0)
    return 2 * math.ceil(longest / profile.timeout_min) + 10


def with_estimate(spec: SweepSpec, mfu: float | None, gpu_peak_tflops: float | None
                  ) -> Estimate:
    """The spec's estimate with a profile's mfu / peak (None = keep the spec's)."""
    est = spec.estimate
    return replace(est, mfu=est.mfu if mfu is None else mfu,
                   gpu_peak_tflops=est.gpu_peak_tflops if gpu_peak_tflops is None
                   else gpu_peak_tflops, device="gpu")  # a cluster profile counts GPUs


# --------------------------------------------------------------------------- output


def format_plan(runs: list[RunPlan], fmt: str = "table", device: str = "gpu") -> str:
    """Render the plan as an aligned table, CSV or JSON (raw numbers in CSV and JSON).

    With `device = "cpu"` (the estimate's) the table counts core-hours and says how long
    the sweep takes on 2 and 8 cores (one run per core); CSV and JSON keep `gpu_hours`.
    """
    if fmt not in FORMATS:
        raise SpecError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    rows = [r.row() for r in runs]
    if not any(r.layout for r in runs):
        rows = [{k: v for k, v in row.items() if k not in ("layout", "mem_per_gpu_gib")}
                for row in rows]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if rows and "layout" in rows[0]:  # one CSV cell per layout field
        rows = [{**{k: v for k, v in row.items() if k != "layout"},
                 **{f"layout.{k}": v for k, v in row["layout"].items()}} for row in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    return _table(runs, device)


def _table(runs: list[RunPlan], device: str = "gpu") -> str:
    header = ["run_id", "d_model", "n_layers", "E", "k", "sparsity", "total", "active",
              "tokens", "tpp", "flops", "core_hours" if device == "cpu" else "gpu_hours"]
    body = [[r.run_id, str(r.d_model), str(r.n_layers), str(r.n_experts), str(r.top_k),
             f"{r.sparsity:.3f}", format_count(r.n_params_total),
             format_count(r.n_params_active), format_count(r.tokens), f"{r.tpp:.3g}",
             f"{r.flops:.3g}", f"{r.gpu_hours:.4g}"] for r in runs]
    total_h = sum(r.gpu_hours for r in runs)
    footer = f"{len(runs)} runs, {sum(r.flops for r in runs):.3g} FLOPs, {total_h:.4g} "
    footer += (f"core-hours: about {_hours(total_h / 2)} on 2 cores, {_hours(total_h / 8)} "
               "on 8 (--max-parallel = cores)") if device == "cpu" else "GPU-hours"
    if any(r.layout for r in runs):
        header += ["gpus", "layout", "mem_gib"]
        for row, r in zip(body, runs, strict=True):
            row += [str(r.layout["gpus"]), _layout_text(r.layout), f"{r.mem_per_gpu_gib:.1f}"]
    return render_table(header, body) + footer + "\n"


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _layout_text(layout: dict) -> str:
    """e.g. fsdp16 ep8 mb2x4 ac: sharding, expert degree, micro-batch x accumulation."""
    parts = [f"fsdp{layout['fsdp']}" if layout["data"] == "fsdp" else "ddp"]
    if layout["expert"] > 1:
        parts.append(f"ep{layout['expert']}")
    parts.append(f"mb{layout['micro_batch']}x{layout['grad_accum']}")
    if layout["activation_checkpointing"]:
        parts.append("ac")
    return " ".join(parts)


def render_table(header: list[str], body: list[list[str]]) -> str:
    """Left-aligned text columns separated by two spaces (no escape codes)."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *body]]
    return "\n".join(lines) + "\n"


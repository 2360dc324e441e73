"""Planning: one row per run with its size, budget, FLOPs and estimated GPU-hours.

GPU-hours = train FLOPs / (mfu * gpu_peak_tflops * 1e12) / 3600, with mfu and
peak from the spec's [estimate] unless a cluster profile gives its own.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, fields, replace

from moe.config import RunConfig, config_hash
from moe.params import count_params, format_count, resolve_tokens, train_flops_per_token
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
    """1 - top_k / n_experts."""
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

    def row(self) -> dict:
        """The plan row without the config (for tables, CSV and JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}


def plan(spec: SweepSpec, estimate: Estimate | None = None) -> list[RunPlan]:
    """Expand and validate the spec; apply the GPU-hour filters; return the runs in order.

    `estimate` (from a cluster profile) replaces the spec's [estimate] when given.
    """
    estimate = estimate or spec.estimate
    runs = [plan_run(cfg, estimate) for cfg in expand(spec).configs]
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


def with_estimate(spec: SweepSpec, mfu: float | None, gpu_peak_tflops: float | None
                  ) -> Estimate:
    """The spec's estimate with a profile's mfu / peak (None = keep the spec's)."""
    est = spec.estimate
    return replace(est, mfu=est.mfu if mfu is None else mfu,
                   gpu_peak_tflops=est.gpu_peak_tflops if gpu_peak_tflops is None
                   else gpu_peak_tflops)


# --------------------------------------------------------------------------- output


def format_plan(runs: list[RunPlan], fmt: str = "table") -> str:
    """Render the plan as an aligned table, CSV or JSON (raw numbers in CSV and JSON)."""
    if fmt not in FORMATS:
        raise SpecError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    rows = [r.row() for r in runs]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    return _table(runs)


def _table(runs: list[RunPlan]) -> str:
    header = ["run_id", "d_model", "n_layers", "E", "k", "sparsity", "total", "active",
              "tokens", "tpp", "flops", "gpu_hours"]
    body = [[r.run_id, str(r.d_model), str(r.n_layers), str(r.n_experts), str(r.top_k),
             f"{r.sparsity:.3f}", format_count(r.n_params_total),
             format_count(r.n_params_active), format_count(r.tokens), f"{r.tpp:.3g}",
             f"{r.flops:.3g}", f"{r.gpu_hours:.4g}"] for r in runs]
    total_h = sum(r.gpu_hours for r in runs)
    footer = f"{len(runs)} runs, {sum(r.flops for r in runs):.3g} FLOPs, {total_h:.4g} GPU-hours"
    return render_table(header, body) + footer + "\n"


def render_table(header: list[str], body: list[list[str]]) -> str:
    """Left-aligned text columns separated by two spaces (no escape codes)."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *body]]
    return "\n".join(lines) + "\n"


"""Sparsity analysis of a results table, per task and task kind (memorization / reasoning).

Following Nakamura et al. 2026 ("Optimal Sparsity of Mixture-of-Experts Language Models for
Reasoning Tasks", arXiv 2508.18672): sparsity s = 1 - k/E; task loss versus s at fixed width
(d_model) and at fixed active parameters; a U-shape fit with its optimum; task loss versus
pre-training loss with one slope per sparsity; and, at equal pre-training loss, the effect of
top-k. Every function takes a DataFrame and returns frozen results or a DataFrame.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from moe.analysis import identify
from moe.analysis.columns import ensure_canonical
from moe.analysis.tables import PRETRAIN_LOSS, task_kind, task_names

MIN_CONVEX_SHARE = 0.9  # of bootstrap resamples, for an identified U-shape optimum
Z95 = 1.959964


@dataclass(frozen=True, kw_only=True)
class UShapeFit:
    """Quadratic y = c0 + c1 x + c2 x^2 and its minimum x* = -c1 / (2 c2) (if c2 > 0)."""

    x_name: str  # "sparsity" or "log_tpp"
    coef: tuple  # (c0, c1, c2)
    n_points: int
    optimum: float  # x*, NaN unless convex
    interior: bool  # x* within the observed x range
    interval: tuple  # percentile bootstrap interval of x* over convex resamples
    convex_fraction: float  # share of bootstrap resamples with c2 > 0
    n_boot: int
    x_range: tuple = (float("nan"), float("nan"))  # sampled x
    verdict: identify.Verdict = field(default_factory=lambda: identify.Verdict(identified=True))


def ushape_issues(fit: UShapeFit) -> list:
    """Convex, optimum and its interval inside the sampled range, convex in most resamples."""
    lo, hi = fit.x_range
    issues = identify.optimum_inside(fit.optimum, lo, hi, f"the {fit.x_name} optimum")
    if fit.n_boot and fit.convex_fraction < MIN_CONVEX_SHARE:
        issues.append(identify.Issue(message=f"only {100 * fit.convex_fraction:.0f}% of "
                                     "bootstrap resamples are U-shaped"))
    i_lo, i_hi = fit.interval
    if fit.n_boot and np.isfinite(fit.optimum) and not (lo <= i_lo and i_hi <= hi):
        issues.append(identify.Issue(message=f"the optimum's interval [{i_lo:.3g}, {i_hi:.3g}] "
                                     f"leaves the sampled range [{lo:.3g}, {hi:.3g}]"))
    return issues


def linear_verdict(estimate: float, se: float, n_distinct: int, what: str) -> identify.Verdict:
    """A regression coefficient: >= 3 distinct x values and a 95% interval no wider than the
    estimate."""
    issues = []
    if n_distinct < identify.MIN_DISTINCT:
        issues.append(identify.Issue(message=f"{n_distinct} distinct {what} value(s); need "
                                     f"{identify.MIN_DISTINCT}"))
    if not np.isfinite(se) or 2 * Z95 * se > abs(estimate):
        issues.append(identify.Issue(message=f"the 95% interval (+-{Z95 * se:.2g}) is wider "
                                     "than the estimate"))
    return identify.Verdict.of(issues)


def task_metric_col(task: str, metric: str) -> str:
    return f"task/{task}/{metric}"


def tasks_with(df: pd.DataFrame, metric: str = "loss") -> list[str]:
    """Tasks that have a numeric ``task/<name>/<metric>`` column with at least one value."""
    out = []
    for task in task_names(df):
        col = task_metric_col(task, metric)
        if col in df and pd.to_numeric(df[col], errors="coerce").notna().any():
            out.append(task)
    return out


def long_table(df: pd.DataFrame, metric: str = "loss") -> pd.DataFrame:
    """One row per (run, task): run columns plus task, kind and ``value`` (the metric)."""
    df = ensure_canonical(df)
    keep = [c for c in ("run_id", "d_model", "n_experts", "top_k", "sparsity", "tpp", "tokens",
                        "n_params_total", "n_params_active", PRETRAIN_LOSS) if c in df]
    frames = []
    for task in tasks_with(df, metric):
        part = df[keep].copy()
        part["task"] = task
        part["kind"] = task_kind(df, task)
        part["value"] = pd.to_numeric(df[task_metric_col(task, metric)], errors="coerce")
        frames.append(part)
    if not frames:
        return pd.DataFrame(columns=keep + ["task", "kind", "value"])
    return pd.concat(frames, ignore_index=True).dropna(subset=["value"])


def fit_ushape(x, y, *, x_name: str = "sparsity", n_boot: int = 500, seed: int = 0,
               level: float = 0.95) -> UShapeFit:
    """Least-squares quadratic in x with a seeded row-bootstrap interval for its minimum."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(np.unique(x)) < 3:
        raise ValueError(f"a U-shape fit needs >= 3 distinct {x_name} values, "
                         f"got {len(np.unique(x))}")
    c2, c1, c0 = np.polyfit(x, y, 2)
    optimum = -c1 / (2 * c2) if c2 > 0 else float("nan")
    rng = np.random.default_rng(seed)
    opts, convex = [], 0
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        b2, b1, _ = np.polyfit(x[idx], y[idx], 2)
        if b2 > 0:
            convex += 1
            opts.append(-b1 / (2 * b2))
    tail = 100 * (1 - level) / 2
    interval = (tuple(float(v) for v in np.percentile(opts, [tail, 100 - tail]))
                if opts else (float("nan"), float("nan")))
    fit = UShapeFit(x_name=x_name, coef=(float(c0), float(c1), float(c2)), n_points=len(x),
                    optimum=float(optimum),
                    interior=bool(np.isfinite(optimum) and x.min() <= optimum <= x.max()),
                    interval=interval, convex_fraction=convex / max(n_boot, 1), n_boot=n_boot,
                    x_range=(float(x.min()), float(x.max())))
    return replace(fit, verdict=identify.Verdict.of(ushape_issues(fit)))


def width_groups(long: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The column that holds "fixed width": d_model, or d_model at each token budget.

    A sweep with several fixed token budgets per width (e.g. the demo's 250k and 1M)
    must not pool them: runs trained on four times the data would dominate the sparsity
    trend. A budget is "fixed" when several runs of a width share it; at fixed tokens
    per parameter every run has its own token count, and width alone is the group.
    Returns the table (with a `width_budget` label column when needed) and the column.
    """
    if "tokens" not in long or long["tokens"].nunique() <= 1:
        return long, "d_model"
    runs_per_budget = long.groupby(["task", "d_model", "tokens"]).size()
    if (runs_per_budget < 2).any():
        return long, "d_model"
    labels = [f"{d:g} @ {t:.3g} tokens" for d, t in zip(long["d_model"], long["tokens"],
                                                         strict=True)]
    return long.assign(width_budget=labels), "width_budget"


def loss_vs_sparsity(long: pd.DataFrame, *, by: str = "d_model") -> pd.DataFrame:
    """Mean task metric per (task, kind, group, sparsity); ``by`` is d_model (fixed width) or
    n_params_active (fixed active parameters, grouped to 2 significant digits)."""
    if by not in long or "sparsity" not in long:
        return pd.DataFrame()
    data = long.copy()
    if by == "n_params_active":
        data[by] = data[by].astype(float).map(lambda v: float(f"{v:.2g}"))
    return (data.groupby(["task", "kind", by, "sparsity"])["value"]
            .agg(mean="mean", n="count").reset_index())


def ushape_by_group(long: pd.DataFrame, *, by: str | None = "d_model", x: str = "sparsity",
                    n_boot: int = 500, seed: int = 0) -> tuple[list[dict], list[str]]:
    """A U-shape fit per (task, group), or per task with ``by=None``; x is "sparsity" or
    "log_tpp" (log tokens per parameter). Returns (rows, skip reasons)."""
    rows, skipped = [], []
    if x == "log_tpp" and "tpp" in long:
        long = long.assign(log_tpp=np.log(pd.to_numeric(long["tpp"], errors="coerce")))
    if by is None:
        long, by = long.assign(all_runs=0.0), "all_runs"
    if by not in long or x not in long:
        return rows, [f"U-shape fits skipped: the table lacks {by!r} or {x!r}"]
    for (task, group), part in long.groupby(["task", by]):
        try:
            fit = fit_ushape(part[x], part["value"], x_name=x, n_boot=n_boot, seed=seed)
        except ValueError as exc:
            skipped.append(f"{task}, {by}={group}: {exc}")
            continue
        rows.append({"task": task, "kind": part["kind"].iloc[0], by: group, "fit": fit})
    return rows, skipped


def pretrain_slopes(long: pd.DataFrame) -> pd.DataFrame:
    """Per (task, sparsity): least-squares slope of task metric on pre-training loss."""
    rows = []
    if PRETRAIN_LOSS not in long or "sparsity" not in long:
        return pd.DataFrame()
    for (task, s), part in long.dropna(subset=[PRETRAIN_LOSS]).groupby(["task", "sparsity"]):
        if part[PRETRAIN_LOSS].nunique() < 2:
            continue
        x, y = part[PRETRAIN_LOSS].to_numpy(float), part["value"].to_numpy(float)
        (slope, intercept), cov = _line(x, y)
        verdict = linear_verdict(slope, float(np.sqrt(cov)), len(np.unique(x)),
                                 "pre-training loss")
        rows.append({"task": task, "kind": part["kind"].iloc[0], "sparsity": s,
                     "slope": slope, "intercept": intercept, "se": float(np.sqrt(cov)),
                     "n": len(part), **verdict.to_dict(), "reason": verdict.reason})
    return pd.DataFrame(rows)


def _line(x: np.ndarray, y: np.ndarray):
    """Least-squares line: ((slope, intercept), variance of the slope; inf with no dof)."""
    slope, intercept = np.polyfit(x, y, 1)
    dof = len(x) - 2
    sxx = float(np.sum((x - x.mean()) ** 2))
    if dof < 1 or sxx <= 0:
        return (slope, intercept), float("inf")
    sigma2 = float(np.sum((y - slope * x - intercept) ** 2) / dof)
    return (slope, intercept), sigma2 / sxx


def topk_effect(long: pd.DataFrame) -> pd.DataFrame:
    """At equal pre-training loss, the effect of top-k on the task metric, per task.

    OLS (ANCOVA): value = c0 + c1 * pretrain_loss + sum_k g_k 1[top_k = k], with the smallest
    k as reference. Returns g_k (difference vs the reference k at equal pre-training loss), its
    standard error and n per task and k.
    """
    rows = []
    if PRETRAIN_LOSS not in long or "top_k" not in long:
        return pd.DataFrame()
    for task, part in long.dropna(subset=[PRETRAIN_LOSS, "top_k"]).groupby("task"):
        ks = np.sort(part["top_k"].unique())
        if len(ks) < 2:
            continue
        design = [np.ones(len(part)), part[PRETRAIN_LOSS].to_numpy(float)]
        design += [(part["top_k"] == k).to_numpy(float) for k in ks[1:]]
        x = np.column_stack(design)
        y = part["value"].to_numpy(float)
        dof = len(y) - x.shape[1]
        if dof < 1 or np.linalg.matrix_rank(x) < x.shape[1]:
            continue
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        sigma2 = float(np.sum((y - x @ coef) ** 2) / dof)
        se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
        for j, k in enumerate(ks[1:], start=2):
            verdict = linear_verdict(coef[j], float(se[j]), part[PRETRAIN_LOSS].nunique(),
                                     "pre-training loss")
            rows.append({"task": task, "kind": part["kind"].iloc[0], "top_k": int(k),
                         "reference_k": int(ks[0]), "effect": coef[j], "se": se[j],
                         "n": len(y), **verdict.to_dict(), "reason": verdict.reason})
    return pd.DataFrame(rows)

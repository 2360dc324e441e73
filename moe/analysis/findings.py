"""The paper's findings, tested on a results table: an estimate, a bootstrap interval over
runs, and whether the interval resolves the finding (``findings.json``).

Nakamura et al. 2026 (arXiv 2508.18672) report, among others:

- memorization task loss follows pre-training loss: across sparsities it lies on one curve;
- reasoning task loss has an interior optimum in sparsity at fixed active parameters;
- at equal pre-training loss, a larger top-k gives a lower reasoning loss.

Each finding here is one statistic with a stated null. Every interval is a seeded percentile
bootstrap over runs (rows are resampled with replacement and the statistic recomputed). A
finding is ``resolved`` only when its interval lies wholly on one side of the null:
``agrees_with_paper`` is then True or False, and it is None when the data cannot tell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from moe.analysis.columns import ensure_canonical
from moe.analysis.sparsity import task_metric_col, tasks_with
from moe.analysis.tables import PRETRAIN_LOSS, task_kind
from moe.errors import BadInput

LEVEL = 0.95
MEMO_MARGIN = 0.2  # "one curve": sparsity's share of the movement of memorization loss < 1/5
MIN_RUNS = 6
MIN_SPARSITIES = 3  # distinct sparsities in a fixed-active-parameter group for a curvature


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One of the paper's findings as tested on a table (a row of findings.json)."""

    id: str
    statement: str  # the paper's claim, in words
    null: str  # what the interval must exclude for the finding to be resolved
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    resolved: bool
    agrees_with_paper: bool | None  # None unless resolved
    n_runs: int
    reason: str  # why it is (not) resolved, in words
    unit: str = ""
    null_at: tuple = ()  # the null's boundaries, in the estimate's unit (for figures)

    def __post_init__(self):
        if not self.resolved and self.agrees_with_paper is not None:
            raise ValueError(f"finding {self.id}: agrees_with_paper must be None when not "
                             "resolved")

    @property
    def verdict(self) -> str:
        """found / found the opposite / not resolved at this scale."""
        if not self.resolved:
            return "not resolved at this scale"
        return "found" if self.agrees_with_paper else "found the opposite"

    def to_dict(self) -> dict:
        return asdict(self)


MEMO = ("memorization_follows_pretraining_loss",
        "Memorization task loss is a function of pre-training loss alone: runs of every "
        "sparsity lie on one curve.",
        f"sparsity's share of what moves memorization loss across the sweep (sparsity at "
        f"equal pre-training loss, and pre-training loss) is at least {MEMO_MARGIN:g}")
REASON = ("reasoning_optimal_sparsity",
          "At fixed active parameters, reasoning task loss is lowest at an interior sparsity "
          "(a U-shape).",
          "the lowest reasoning loss lies at the smallest or the largest sampled sparsity")
TOPK = ("topk_helps_reasoning_at_equal_loss",
        "At equal pre-training loss, a larger top-k gives a lower reasoning task loss.",
        "top-k has no effect on reasoning loss at equal pre-training loss (slope 0)")


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: design columns, pre-training loss, and the mean task loss of each
    kind (``memorization``, ``reasoning``; NaN when the table has no such task)."""
    df = ensure_canonical(df)
    design = ("d_model", "n_experts", "top_k", "sparsity", "tokens", "n_params_active",
              PRETRAIN_LOSS)
    out = pd.DataFrame({c: pd.to_numeric(df[c], errors="coerce") if c in df else np.nan
                        for c in design}, index=df.index)
    for kind in ("memorization", "reasoning"):
        cols = [task_metric_col(t, "loss") for t in tasks_with(df, "loss")
                if task_kind(df, t) == kind]
        out[kind] = (df[cols].apply(pd.to_numeric, errors="coerce").mean(axis=1, skipna=False)
                     if cols else np.nan)
    return out.reset_index(drop=True)


def bootstrap(rows: pd.DataFrame, statistic: Callable[[pd.DataFrame], float], *,
              n_boot: int, seed: int) -> np.ndarray:
    """The statistic on ``n_boot`` resamples of the rows (with replacement), generator
    ``default_rng([seed, i])`` per resample; NaN where a resample cannot be fitted."""
    out = np.full(n_boot, np.nan)
    for i in range(n_boot):
        idx = np.random.default_rng([seed, i]).integers(0, len(rows), len(rows))
        out[i] = statistic(rows.iloc[idx])
    return out


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """Percentile interval; a resample that cannot be fitted counts as unbounded (+inf),
    so an unstable statistic gets a wide, honest interval."""
    vals = np.where(np.isfinite(samples) | np.isinf(samples), samples, np.inf)
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(vals, [tail, 100 - tail])
    return float(lo), float(hi)


def _ols(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Least-squares coefficients, or None when the design is rank-deficient or saturated."""
    if len(y) <= x.shape[1] or np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    return np.linalg.lstsq(x, y, rcond=None)[0]


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _unresolved(spec, n_runs: int, reason: str, estimate=None, ci=(None, None),
                unit: str = "", null_at: tuple = ()) -> Finding:
    return Finding(id=spec[0], statement=spec[1], null=spec[2], estimate=_finite(estimate),
                   ci_low=_finite(ci[0]), ci_high=_finite(ci[1]), resolved=False,
                   agrees_with_paper=None, n_runs=n_runs, reason=reason, unit=unit,
                   null_at=null_at)


def _memo_fit(rows: pd.DataFrame) -> tuple[float, float]:
    """(sparsity share, b) from memorization = a + b * pretrain + g * sparsity: the share is
    S / (S + max(P, 0)) with S = |g| x range(s) and P = b x range(pre-training loss), the
    movements across the sampled ranges; 1 when memorization does not fall with
    pre-training loss (b <= 0); NaN when the fit is not possible."""
    x, s = rows[PRETRAIN_LOSS].to_numpy(float), rows["sparsity"].to_numpy(float)
    coef = _ols(np.column_stack([np.ones(len(x)), x, s]), rows["memorization"].to_numpy(float))
    if coef is None:
        return float("nan"), float("nan")
    move_s, move_p = abs(coef[2]) * np.ptp(s), max(coef[1] * np.ptp(x), 0.0)
    if move_s + move_p <= 0:
        return float("nan"), float(coef[1])
    return float(move_s / (move_s + move_p)), float(coef[1])


def memo_share(rows: pd.DataFrame) -> float:
    """Sparsity's share of the movement of memorization loss (see :func:`_memo_fit`)."""
    return _memo_fit(rows)[0]


def memorization_finding(rows: pd.DataFrame, *, n_boot: int, seed: int) -> Finding:
    rows = rows.dropna(subset=[PRETRAIN_LOSS, "sparsity", "memorization"])
    n = len(rows)
    if n < MIN_RUNS or rows["sparsity"].nunique() < 2:
        return _unresolved(MEMO, n, f"{n} run(s) with a memorization loss at "
                           f"{rows['sparsity'].nunique()} sparsit(ies); need {MIN_RUNS} at 2+")
    est, slope = _memo_fit(rows)
    lo, hi = _interval(bootstrap(rows, memo_share, n_boot=n_boot, seed=seed))
    unit, null_at = "sparsity's share of the memorization-loss movement", (MEMO_MARGIN,)
    common = dict(id=MEMO[0], statement=MEMO[1], null=MEMO[2], estimate=_finite(est),
                  ci_low=_finite(lo), ci_high=_finite(hi), resolved=True, n_runs=n, unit=unit,
                  null_at=null_at)
    if hi < MEMO_MARGIN:
        return Finding(**common, agrees_with_paper=True,
                       reason=f"the interval lies below the margin {MEMO_MARGIN:g}")
    if lo > MEMO_MARGIN:
        why = (f"memorization loss does not fall with pre-training loss (slope {slope:.3g})"
               if slope <= 0 else "at equal pre-training loss, sparsity moves memorization "
               "loss by more than the margin")
        return Finding(**common, agrees_with_paper=False, reason=why)
    return _unresolved(MEMO, n, f"the interval straddles the margin {MEMO_MARGIN:g} (sparsity "
                       "and pre-training loss vary together, or the runs are too noisy)",
                       est, (lo, hi), unit, null_at)


def _active_groups(rows: pd.DataFrame) -> pd.Series:
    """A label per run for "same active parameters and token budget": the same width, top-k
    and tokens (a router's d x E weights differ with E but compute nothing per expert), or,
    without width and top-k columns, active parameters to 2 significant digits."""
    if rows["d_model"].notna().all() and rows["top_k"].notna().all():
        keys = zip(rows["d_model"], rows["top_k"], rows["tokens"], strict=True)
        labels = [f"d{d:g}-k{k:g}@{t:.3g}" for d, k, t in keys]
    else:
        keys = zip(rows["n_params_active"], rows["tokens"], strict=True)
        labels = [f"{a:.2g}@{t:.3g}" for a, t in keys]
    return pd.Series(labels, index=rows.index, dtype=object)


def log_ratio(sparsity) -> np.ndarray:
    """x = log2(E/k) = -log2(1 - s): sparsities 0, 1/2, 3/4, 7/8 ... evenly spaced."""
    return -np.log2(1.0 - np.asarray(sparsity, dtype=float))


def reasoning_optimum(rows: pd.DataFrame, bounds: tuple | None = None) -> float:
    """The minimiser over ``bounds`` (default: the sampled range) of x = log2(E/k) of
    reasoning = group intercept + c1 x + c2 x^2 (one intercept per fixed-active-parameter
    group, one shared curvature)."""
    x = log_ratio(rows["sparsity"])
    groups = pd.get_dummies(rows["group"]).to_numpy(float)
    coef = _ols(np.column_stack([groups, x, x * x]), rows["reasoning"].to_numpy(float))
    if coef is None:
        return float("nan")
    c1, c2 = coef[-2], coef[-1]
    lo, hi = bounds or (float(x.min()), float(x.max()))
    cand = [lo, hi] + ([-c1 / (2 * c2)] if c2 > 0 and lo < -c1 / (2 * c2) < hi else [])
    return float(min(cand, key=lambda v: c1 * v + c2 * v * v))


def _to_sparsity(x: float) -> float:
    return float(1.0 - 2.0 ** (-x))


def reasoning_finding(rows: pd.DataFrame, *, n_boot: int, seed: int) -> Finding:
    rows = rows.dropna(subset=["sparsity", "reasoning", "n_params_active"])
    if len(rows) < MIN_RUNS:
        return _unresolved(REASON, len(rows), f"{len(rows)} run(s) with sparsity, active "
                           f"parameters and a reasoning loss; need {MIN_RUNS}")
    rows = rows.assign(group=_active_groups(rows))
    per_group = rows.groupby("group")["sparsity"].transform("nunique")
    rows = rows[per_group >= MIN_SPARSITIES]
    n = len(rows)
    if n < MIN_RUNS:
        return _unresolved(REASON, n, "no fixed-active-parameter group has runs at "
                           f"{MIN_SPARSITIES}+ sparsities (or fewer than {MIN_RUNS} runs)")
    x = log_ratio(rows["sparsity"])
    lo_x, hi_x = float(x.min()), float(x.max())
    est = reasoning_optimum(rows)
    # every resample is minimised over the full data's range, so "at an edge" is exact
    lo, hi = _interval(bootstrap(rows, lambda r: reasoning_optimum(r, (lo_x, hi_x)),
                                 n_boot=n_boot, seed=seed))
    ci = (_to_sparsity(lo) if np.isfinite(lo) else None,
          _to_sparsity(hi) if np.isfinite(hi) else None)
    unit, null_at = "sparsity s = 1 - k/E", (_to_sparsity(lo_x), _to_sparsity(hi_x))
    common = dict(id=REASON[0], statement=REASON[1], null=REASON[2], estimate=_to_sparsity(est),
                  ci_low=ci[0], ci_high=ci[1], resolved=True, n_runs=n, unit=unit,
                  null_at=null_at)
    if lo_x < lo and hi < hi_x:
        return Finding(**common, agrees_with_paper=True,
                       reason=f"the optimum's interval lies inside the sampled sparsities "
                       f"[{_to_sparsity(lo_x):.3g}, {_to_sparsity(hi_x):.3g}]")
    if lo == hi and lo in (lo_x, hi_x):
        edge = "largest" if lo == hi_x else "smallest"
        return Finding(**common, agrees_with_paper=False,
                       reason=f"in {100 * LEVEL:.0f}% of resamples the lowest reasoning loss is "
                       f"at the {edge} sampled sparsity (monotone in the sampled range)")
    return _unresolved(REASON, n, "the optimum's interval reaches an edge of the sampled "
                       f"sparsities [{_to_sparsity(lo_x):.3g}, {_to_sparsity(hi_x):.3g}]",
                       common["estimate"], ci, unit, null_at)


def topk_slope(rows: pd.DataFrame) -> float:
    """g in reasoning = a + b * pretrain + g * log2(k): the change per doubling of k (fitted
    on the runs of :func:`matched_total_cells`)."""
    k = np.log2(rows["top_k"].to_numpy(float))
    x = rows[PRETRAIN_LOSS].to_numpy(float)
    coef = _ols(np.column_stack([np.ones(len(x)), x, k]), rows["reasoning"].to_numpy(float))
    return float("nan") if coef is None else float(coef[2])


def matched_total_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """MoE runs in cells of matched total parameters (same width, E and token budget) that
    hold 2+ top-k values: every k is compared on the same models, so a width or budget
    that only some k have cannot pass for a top-k effect."""
    rows = rows[~(rows["n_experts"] <= 1)]  # a dense model's k is moot
    if rows[["d_model", "n_experts"]].isna().any().any():
        return rows  # no design columns: every MoE run
    cell = rows.groupby(["d_model", "n_experts", "tokens"], dropna=False)["top_k"]
    return rows[cell.transform("nunique") >= 2]


def topk_finding(rows: pd.DataFrame, *, n_boot: int, seed: int) -> Finding:
    rows = matched_total_cells(rows.dropna(subset=[PRETRAIN_LOSS, "top_k", "reasoning"]))
    n, n_k = len(rows), rows["top_k"].nunique()
    if n_k < 2 or n < MIN_RUNS:
        return _unresolved(TOPK, n, f"{n} MoE run(s) at matched total parameters with a "
                           f"pre-training loss, {n_k} top-k value(s); need {MIN_RUNS} runs at "
                           "2+ values")
    est = topk_slope(rows)
    lo, hi = _interval(bootstrap(rows, topk_slope, n_boot=n_boot, seed=seed))
    unit = "reasoning loss (nats/token) per doubling of k"
    common = dict(id=TOPK[0], statement=TOPK[1], null=TOPK[2], estimate=_finite(est),
                  ci_low=_finite(lo), ci_high=_finite(hi), n_runs=n, unit=unit, null_at=(0.0,))
    if hi < 0:
        return Finding(**common, resolved=True, agrees_with_paper=True,
                       reason="the interval lies below 0: larger k, lower reasoning loss")
    if lo > 0:
        return Finding(**common, resolved=True, agrees_with_paper=False,
                       reason="the interval lies above 0: larger k, higher reasoning loss")
    return _unresolved(TOPK, n, "the interval contains 0", est, (lo, hi), unit, (0.0,))


def compute_findings(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> list[Finding]:
    """The three findings on a results table, in a fixed order."""
    if n_boot < 2:
        raise BadInput(f"n_boot must be >= 2 for a bootstrap interval, got {n_boot}")
    rows = run_table(df)
    return [memorization_finding(rows, n_boot=n_boot, seed=seed),
            reasoning_finding(rows, n_boot=n_boot, seed=seed),
            topk_finding(rows, n_boot=n_boot, seed=seed)]


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def findings_section(found: list[Finding]) -> list[str]:
    """The report's first section: each finding in plain words."""
    out = ["## The paper's findings at this scale", "",
           f"Each finding is one statistic with a {100 * LEVEL:.0f}% bootstrap interval over "
           "runs; it is resolved only when the interval excludes its null "
           "(see findings.json for the nulls).", "",
           "| finding | verdict | estimate | 95% interval | runs | why |",
           "|---|---|---|---|---|---|"]
    out += [f"| {f.id} | **{f.verdict}** | {_fmt(f.estimate)} | [{_fmt(f.ci_low)}, "
            f"{_fmt(f.ci_high)}] | {f.n_runs} | {f.reason} |" for f in found]
    words = [f"- `{f.id}`: {f.statement} Estimate: {f.unit}. Null: {f.null}." for f in found]
    return out + [""] + words + [""]

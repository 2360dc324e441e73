"""The paper's findings, tested on a results table (``findings.json``).

Nakamura et al. 2026 (arXiv 2508.18672) report: (1) at the same pre-training loss,
memorization runs of every sparsity lie on one curve while reasoning fans out by sparsity,
denser doing better; (2) the sparsity best for reasoning is not the one best for
pre-training loss; (3) at equal loss, a larger top-k reasons better. A statistic that the
pre-training loss alone can satisfy does not test (1) or (2): at pocket scale the loss
itself has an interior optimum in sparsity, so "reasoning has an interior optimum" is
found for a model whose reasoning is a pure function of its loss. The findings here
therefore compare reasoning with the loss: the reasoning residual at equal loss, and the
reasoning optimum against the loss optimum. The old interior-optimum statistic is kept
as a description (:func:`sparsity_optima`), beside the loss's own optimum.

Each finding is one statistic with a stated null and a BCa bootstrap interval (bias-
corrected and accelerated: a percentile interval of a statistic near a bound, or with a
skewed bootstrap, can exclude its own estimate). A finding is ``resolved`` only when its
interval lies wholly on one side of the null. Its preconditions (enough runs; the tested
variable not a function of pre-training loss; sparsity moving the loss at all) are
reported, and a failing one makes the verdict "not testable at this scale: <which>",
which is not the same as an interval that straddles the null ("not resolved").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from moe.analysis import findings_stats as fs
from moe.analysis.columns import ensure_canonical
from moe.analysis.resample import Interval, bca, count_weights
from moe.analysis.sparsity import task_metric_col, tasks_with
from moe.analysis.tables import PRETRAIN_LOSS, task_kind
from moe.errors import BadInput

LEVEL = 0.95
N_BOOT = 2000  # default resamples: enough for BCa's 2.5% tails (Efron & Tibshirani: 1000+)
MIN_BOOT = 1000
MEMO_MARGIN = 0.2  # "one curve": |sparsity's share of the memorization-loss movement| < 1/5
MIN_RUNS = 6
MIN_SPARSITIES = 3  # distinct sparsities in a group for an optimum (location + curvature)
MAX_R2 = 0.9  # a tested variable more determined by pre-training loss leaves no "equal loss"
MOVES_P = 0.05  # the loss must move with sparsity (F-test) for a loss optimum to exist


@dataclass(frozen=True, kw_only=True)
class Precondition:
    """What must hold for a finding to be testable on this table, and what the table has."""

    what: str  # the condition, in words
    holds: bool
    detail: str  # the measured value(s)


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
    preconditions: tuple = ()  # Precondition, each reported; a failing one: not testable
    interval: str = "BCa"  # how ci_low/ci_high were made
    n_boot: int = 0
    null_band: tuple = ()  # central 95% of the statistic on permuted, effect-free tables

    def __post_init__(self):
        if not self.resolved and self.agrees_with_paper is not None:
            raise ValueError(f"finding {self.id}: agrees_with_paper must be None when not "
                             "resolved")
        if self.resolved and not self.testable:
            raise ValueError(f"finding {self.id}: resolved with a failing precondition")

    @property
    def testable(self) -> bool:
        return all(p.holds for p in self.preconditions)

    @property
    def verdict(self) -> str:
        """found / found the opposite / not resolved / not testable at this scale: <which>."""
        if not self.testable:
            return "not testable at this scale: " + "; ".join(
                p.what for p in self.preconditions if not p.holds)
        if not self.resolved:
            return "not resolved at this scale"
        return "found" if self.agrees_with_paper else "found the opposite"

    def to_dict(self) -> dict:
        return {**asdict(self), "testable": self.testable, "verdict": self.verdict}


@dataclass(frozen=True, kw_only=True)
class Spec:
    """A finding's fixed text: what the paper says, the null, the estimate's unit."""

    id: str
    statement: str
    null: str
    unit: str
    null_at: tuple


MEMO = Spec(
    id="memorization_follows_pretraining_loss",
    statement="Memorization task loss is a function of pre-training loss alone: runs of "
    "every sparsity lie on one curve.",
    null=f"sparsity's signed share of what moves memorization loss across the sweep "
    f"(sparsity at equal pre-training loss, and pre-training loss) is at least "
    f"{MEMO_MARGIN:g} in size",
    unit="sparsity's signed share of the memorization-loss movement",
    null_at=(-MEMO_MARGIN, MEMO_MARGIN))
FANOUT = Spec(
    id="reasoning_fans_out_at_equal_loss",
    statement="At equal pre-training loss, reasoning task loss rises with sparsity: "
    "denser models reason better.",
    null="the reasoning residual (after a smooth function of pre-training loss fitted on "
    "all runs) does not change with sparsity within fixed-active-parameter groups (slope 0)",
    unit="reasoning residual (nats/token) per doubling of E/k",
    null_at=(0.0,))
GAP = Spec(
    id="reasoning_optimum_denser_than_loss_optimum",
    statement="At fixed active parameters and token budget, the sparsity best for "
    "reasoning is denser than the sparsity best for pre-training loss.",
    null="the reasoning-optimal and the loss-optimal sparsity are the same (mean "
    "difference over groups 0, and no further from 0 than within-group permutations of the "
    "reasoning residuals at equal loss make it)",
    unit="reasoning-optimal minus loss-optimal log2(E/k), mean over groups",
    null_at=(0.0,))
TOPK = Spec(
    id="topk_helps_reasoning_at_equal_loss",
    statement="At equal pre-training loss, a larger top-k gives a lower reasoning task loss.",
    null="top-k has no effect on reasoning loss at equal pre-training loss (slope 0)",
    unit="reasoning loss (nats/token) per doubling of k",
    null_at=(0.0,))


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



def active_groups(rows: pd.DataFrame) -> pd.Series:
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


def matched_total_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """MoE runs in cells of matched total parameters (same width, E and token budget) that
    hold 2+ top-k values: every k is compared on the same models, so a width or budget
    that only some k have cannot pass for a top-k effect."""
    rows = rows[~(rows["n_experts"] <= 1)]  # a dense model's k is moot
    if rows[["d_model", "n_experts"]].isna().any().any():
        return rows  # no design columns: every MoE run
    cell = rows.groupby(["d_model", "n_experts", "tokens"], dropna=False)["top_k"]
    return rows[cell.transform("nunique") >= 2]


def _finite(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _judge(spec: Spec, n: int, pre: list, iv: Interval | None, decide,
           null_band: tuple = ()) -> Finding:
    """The verdict: not testable (a failing precondition), not resolved (no interval, or
    one that straddles the null), or ``decide(low, high) -> (agrees, why)``."""
    common = dict(id=spec.id, statement=spec.statement, null=spec.null, unit=spec.unit,
                  null_at=spec.null_at, n_runs=n, preconditions=tuple(pre),
                  n_boot=iv.n_boot if iv else 0, null_band=null_band)
    failed = [p for p in pre if not p.holds]
    if failed or iv is None:
        return Finding(**common, estimate=None, ci_low=None, ci_high=None, resolved=False,
                       agrees_with_paper=None, reason="not testable: " + "; ".join(
                           f"{p.what} ({p.detail})" for p in failed))
    est, lo, hi = _finite(iv.estimate), _finite(iv.low), _finite(iv.high)
    if not iv.bounded:
        return Finding(**common, estimate=est, ci_low=None, ci_high=None, resolved=False,
                       agrees_with_paper=None, reason=f"no interval: {iv.why}")
    agrees, why = decide(iv.low, iv.high)
    return Finding(**common, estimate=est, ci_low=lo, ci_high=hi, resolved=agrees is not None,
                   agrees_with_paper=agrees, reason=why)


def _sign_rule(paper_sign: int, what_neg: str, what_pos: str):
    """decide() for a null of 0: the paper predicts ``paper_sign``."""
    def decide(lo, hi):
        if hi < 0:
            return paper_sign < 0, f"the interval lies below 0: {what_neg}"
        if lo > 0:
            return paper_sign > 0, f"the interval lies above 0: {what_pos}"
        return None, "the interval contains 0"
    return decide


def _runs_precondition(n: int, what: str, ok: bool, detail: str) -> Precondition:
    return Precondition(what=what, holds=ok and n >= MIN_RUNS, detail=detail)


def _support(target_N, cov_NP, groups, what: str) -> Precondition:
    """``what`` must not be a function of pre-training loss across the runs (``groups``
    None) or within the groups: else "at equal loss" has nothing to compare."""
    target_N = np.asarray(target_N, float)
    r2 = fs.partial_r2(target_N, cov_NP, np.zeros(len(target_N)) if groups is None else groups)
    where = "" if groups is None else "within-group "
    return Precondition(what=f"{what} varies at equal pre-training loss", holds=r2 < MAX_R2,
                        detail=f"{where}R^2 of {what} on pre-training loss {r2:.2f}, "
                        f"need < {MAX_R2:g}")


def memorization_finding(rows: pd.DataFrame, *, n_boot: int, seed: int) -> Finding:
    rows = rows.dropna(subset=[PRETRAIN_LOSS, "sparsity", "memorization"])
    n, n_s = len(rows), rows["sparsity"].nunique()
    pre = [_runs_precondition(n, "runs with a memorization loss at 2+ sparsities", n_s >= 2,
                              f"{n} run(s) at {n_s} sparsit(ies), need {MIN_RUNS} at 2+")]
    if pre[0].holds:
        loss = rows[[PRETRAIN_LOSS]].to_numpy(float)
        pre.append(_support(rows["sparsity"], loss, None, "sparsity"))
    if not all(p.holds for p in pre):
        return _judge(MEMO, n, pre, None, None)
    iv = bca(fs.memo_share_stat(rows), n, count_weights(np.zeros(n), n_boot, seed), level=LEVEL)
    slope = fs.memo_loss_slope(rows)

    def decide(lo, hi):
        if -MEMO_MARGIN < lo and hi < MEMO_MARGIN:
            return True, f"the interval lies inside +-{MEMO_MARGIN:g}"
        if lo >= MEMO_MARGIN or hi <= -MEMO_MARGIN:
            return False, (f"memorization loss does not fall with pre-training loss (slope "
                           f"{slope:.3g})" if slope <= 0 else "at equal pre-training loss, "
                           "sparsity moves memorization loss by more than the margin")
        return None, (f"the interval reaches the margin +-{MEMO_MARGIN:g} (sparsity and "
                      "pre-training loss vary together, or the runs are too noisy)")
    return _judge(MEMO, n, pre, iv, decide)


def fanout_finding(rows: pd.DataFrame, *, n_boot: int, seed: int) -> Finding:
    rows = rows.dropna(subset=[PRETRAIN_LOSS, "sparsity", "reasoning", "n_params_active"])
    rows = rows.assign(group=active_groups(rows)).reset_index(drop=True)
    in_groups = (rows.groupby("group")["sparsity"].transform("nunique") >= 2).to_numpy()
    n, n_g = int(in_groups.sum()), rows.loc[in_groups, "group"].nunique()
    pre = [_runs_precondition(n, "runs in fixed-active-parameter groups of 2+ sparsities",
                              n_g >= 1, f"{n} run(s) in {n_g} group(s), need {MIN_RUNS}")]
    if pre[0].holds:
        basis = fs.loss_curve_basis(rows[PRETRAIN_LOSS].to_numpy(float))[in_groups]
        # across runs, not within groups: f is fitted on every run, so a group whose loss
        # moves with its sparsity is still compared with other groups' runs at its loss
        pre.append(_support(fs.log_ratio(rows.loc[in_groups, "sparsity"]), basis, None,
                            "sparsity"))
    if not all(p.holds for p in pre):
        return _judge(FANOUT, n, pre, None, None)
    w_BN = count_weights(rows["group"].to_numpy(str), n_boot, seed)
    iv = bca(fs.fanout_stat(rows, in_groups), len(rows), w_BN, level=LEVEL)
    return _judge(FANOUT, n, pre, iv, _sign_rule(
        +1, "at equal pre-training loss, sparser models reason better",
        "at equal pre-training loss, denser models reason better"))


def optimum_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Runs with both losses in fixed-active-parameter groups of MIN_SPARSITIES+ sparsities,
    with their ``group`` label: where an optimum in sparsity can be placed."""
    rows = rows.dropna(subset=[PRETRAIN_LOSS, "sparsity", "reasoning", "n_params_active"])
    rows = rows.assign(group=active_groups(rows))
    keep = rows.groupby("group")["sparsity"].transform("nunique") >= MIN_SPARSITIES
    return rows[keep].reset_index(drop=True)


def gap_finding(rows: pd.DataFrame, *, n_boot: int, seed: int) -> Finding:
    rows = optimum_rows(rows)
    n, n_g = len(rows), rows["group"].nunique()
    pre = [_runs_precondition(n, f"fixed-active-parameter groups of {MIN_SPARSITIES}+ "
                              "sparsities", n_g >= 2, f"{n} run(s) in {n_g} group(s), need "
                              f"{MIN_RUNS} in 2+")]
    if pre[0].holds:
        p = fs.sparsity_moves_p(rows, PRETRAIN_LOSS)
        pre.append(Precondition(what="sparsity moves pre-training loss at fixed active "
                                "parameters", holds=bool(p < MOVES_P),
                                detail=f"F-test p = {p:.2g}, need < {MOVES_P:g}"))
    if not all(p.holds for p in pre):
        return _judge(GAP, n, pre, None, None)
    w_BN = count_weights(rows["group"].to_numpy(str), n_boot, seed)
    iv = bca(fs.optimum_gap_stat(rows), n, w_BN, level=LEVEL)
    null_S = fs.null_gaps(rows, n_sims=n_boot, seed=seed)
    band = tuple(float(v) for v in np.quantile(null_S, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]))
    return _judge(GAP, n, pre, iv, _gap_rule(iv.estimate, null_S), band)


def _gap_rule(estimate: float, null_S: np.ndarray):
    """decide() for the gap: its interval must exclude 0 and the gap must be rarer than the
    interval's tail among tables without dissociation (:func:`findings_stats.null_gaps`)."""
    tail = (1 - LEVEL) / 2
    side = _sign_rule(-1, "reasoning is best at a denser model than pre-training loss is",
                      "reasoning is best at a sparser model than pre-training loss is")

    def decide(lo, hi):
        agrees, why = side(lo, hi)
        if agrees is None:
            return agrees, why
        share = float(np.mean(null_S <= estimate) if hi < 0 else np.mean(null_S >= estimate))
        perm = (f"{100 * share:.1f}% of {len(null_S)} within-group permutations of the "
                f"reasoning residuals (no dissociation; mean gap {null_S.mean():.3g}) give a "
                "gap this far out")
        if share >= tail:
            return None, f"{why}, but {perm}: noise alone can make it"
        return agrees, f"{why}; {perm}"
    return decide


def topk_finding(rows: pd.DataFrame, *, n_boot: int, seed: int) -> Finding:
    rows = matched_total_cells(rows.dropna(subset=[PRETRAIN_LOSS, "top_k", "reasoning"]))
    n, n_k = len(rows), rows["top_k"].nunique()
    pre = [_runs_precondition(n, "MoE runs at matched total parameters with 2+ top-k values",
                              n_k >= 2, f"{n} run(s) at {n_k} top-k value(s), need "
                              f"{MIN_RUNS} at 2+")]
    if pre[0].holds:
        pre.append(_support(np.log2(rows["top_k"].to_numpy(float)),
                            rows[[PRETRAIN_LOSS]].to_numpy(float), None, "top-k"))
    if not all(p.holds for p in pre):
        return _judge(TOPK, n, pre, None, None)
    iv = bca(fs.topk_stat(rows), n, count_weights(np.zeros(n), n_boot, seed), level=LEVEL)
    return _judge(TOPK, n, pre, iv, _sign_rule(
        -1, "larger k, lower reasoning loss", "larger k, higher reasoning loss"))


def compute_findings(df: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> list[Finding]:
    """The paper's four findings on a results table, in a fixed order."""
    if n_boot < 2:
        raise BadInput(f"n_boot must be >= 2 for a bootstrap interval, got {n_boot}")
    rows = run_table(df)
    return [f(rows, n_boot=n_boot, seed=seed) for f in (
        memorization_finding, fanout_finding, gap_finding, topk_finding)]


def memo_share(rows: pd.DataFrame) -> float:
    """Sparsity's signed share of the memorization-loss movement on these runs."""
    return float(fs.memo_share_stat(rows)(np.ones((1, len(rows))))[0])


def topk_slope(rows: pd.DataFrame) -> float:
    """Reasoning loss per doubling of k at equal pre-training loss on these runs."""
    return float(fs.topk_stat(rows)(np.ones((1, len(rows))))[0])


@dataclass(frozen=True, kw_only=True)
class SparsityOptimum:
    """Descriptive, not a paper finding: the sparsity minimising a loss at fixed active
    parameters (y = group + c1 x + c2 x^2, pooled over groups), with its BCa interval."""

    quantity: str  # "pre-training loss" or "reasoning"
    estimate: float | None  # sparsity s = 1 - k/E
    ci_low: float | None
    ci_high: float | None
    sampled: tuple  # the sampled sparsity range
    where: str  # "interior", "at an edge" or "undecided" (the interval reaches an edge)
    n_runs: int
    n_groups: int

    def to_dict(self) -> dict:
        return asdict(self)


def sparsity_optima(df: pd.DataFrame, *, n_boot: int = N_BOOT,
                    seed: int = 0) -> list[SparsityOptimum]:
    """The pre-training-loss and reasoning optima in sparsity (the old
    ``reasoning_optimal_sparsity``, which the loss alone can make interior), side by side;
    empty when no group has MIN_SPARSITIES sparsities."""
    rows = optimum_rows(run_table(df))
    if len(rows) < MIN_RUNS:
        return []
    x_N = fs.log_ratio(rows["sparsity"])
    lo_x, hi_x = float(x_N.min()), float(x_N.max())
    w_BN = count_weights(rows["group"].to_numpy(str), n_boot, seed)
    out = []
    for quantity, col in (("pre-training loss", PRETRAIN_LOSS), ("reasoning", "reasoning")):
        iv = bca(fs.pooled_optimum_stat(rows, col), len(rows), w_BN, level=LEVEL)
        if not iv.bounded:
            where = "undecided"
        elif lo_x < iv.low and iv.high < hi_x:
            where = "interior"
        elif iv.low == iv.high and iv.low in (lo_x, hi_x):
            where = "at an edge"
        else:
            where = "undecided"

        def s(v):
            return _finite(float(fs.to_sparsity(v))) if v is not None else None
        out.append(SparsityOptimum(quantity=quantity, estimate=s(iv.estimate),
                                   ci_low=s(iv.low), ci_high=s(iv.high),
                                   sampled=(s(lo_x), s(hi_x)), where=where, n_runs=len(rows),
                                   n_groups=rows["group"].nunique()))
    return out


def missing_columns(df: pd.DataFrame) -> list[str]:
    """What a table lacks for every finding to be computed (empty: it has all)."""
    df = ensure_canonical(df)
    out = [c for c in (PRETRAIN_LOSS, "sparsity") if c not in df]
    kinds = {task_kind(df, t) for t in tasks_with(df, "loss")}
    out += [f"a {k} task loss (task/<name>/loss with kind {k})"
            for k in ("memorization", "reasoning") if k not in kinds]
    return out


def findings_and_optima(df: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0):
    """(findings, descriptive optima) with at least MIN_BOOT resamples: what the report and
    ``moe report --findings-only`` write. The findings' resamples are cheap (vectorised),
    so a report's smaller --bootstrap for the law fits does not thin their tails."""
    n_boot = max(n_boot, MIN_BOOT)
    return (compute_findings(df, n_boot=n_boot, seed=seed),
            sparsity_optima(df, n_boot=n_boot, seed=seed))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def findings_section(found: list[Finding], optima: list[SparsityOptimum] = ()) -> list[str]:
    """The report's first section: each finding, its preconditions, and the descriptive
    sparsity optima beside each other."""
    n_boot = max((f.n_boot for f in found), default=0)
    out = ["## The paper's findings at this scale", "",
           f"Each finding is one statistic with a {100 * LEVEL:.0f}% BCa bootstrap interval "
           f"over runs ({n_boot} resamples); it is resolved only when the interval excludes "
           "its null (see findings.json for the nulls), and not testable when a precondition "
           "fails.", "",
           "| finding | verdict | estimate | 95% interval | runs | why |",
           "|---|---|---|---|---|---|"]
    out += [f"| {f.id} | **{f.verdict}** | {_fmt(f.estimate)} | [{_fmt(f.ci_low)}, "
            f"{_fmt(f.ci_high)}] | {f.n_runs} | {f.reason} |" for f in found]
    out += [""] + [f"- `{f.id}`: {f.statement} Estimate: {f.unit}. Null: {f.null}. "
                   "Preconditions: " + "; ".join(
                       f"{p.what}: {'yes' if p.holds else 'NO'} ({p.detail})"
                       for p in f.preconditions) + "." for f in found]
    if optima:
        out += ["", "Descriptive, not findings: the sparsity optimum of each loss at fixed "
                "active parameters (one quadratic in log2(E/k) per loss, an intercept per "
                f"group; {optima[0].n_groups} groups, {optima[0].n_runs} runs). An interior "
                "reasoning optimum alone does not test the paper: the pre-training loss can "
                "have one too.", "",
                "| loss | optimal sparsity | 95% interval | sampled | where |",
                "|---|---|---|---|---|"]
        out += [f"| {o.quantity} | {_fmt(o.estimate)} | [{_fmt(o.ci_low)}, {_fmt(o.ci_high)}]"
                f" | [{_fmt(o.sampled[0])}, {_fmt(o.sampled[1])}] | {o.where} |"
                for o in optima]
    return out + [""]

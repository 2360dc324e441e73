"""Approach 2 of Hoffmann et al. 2022: IsoFLOP profiles.

For each compute budget C (runs binned by log10 C), fit a parabola of loss in log N,
L = p0 + p1 log N + p2 (log N)^2, take its vertex N_opt(C) = exp(-p1 / (2 p2)), set
D_opt = C / (6 N_opt), then fit log N_opt = a log C + const and log D_opt = b log C + const.

Known bias (stated in every output): at fixed C the Chinchilla loss
L(N) = E + A N^-alpha + B (C/6N)^-beta is not symmetric in log N, so a parabola's vertex is
pulled towards the flatter side of the minimum; the shift depends on how wide and how
off-centre the sampled N grid is at each budget, so a and b come out biased (see Besiroglu
et al. 2024, arXiv 2404.10102, and Pearce & Song 2024, arXiv 2406.12907, on how the choice of
approach and grid moves the exponents). :func:`parabola_bias` measures the size of that bias
for a given Approach-3 law on the same (N, C) grid as the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moe.analysis import identify, laws

BIAS_NOTE = ("Approach 2 is biased: the IsoFLOP curve is asymmetric in log N, so the parabola "
             "vertex shifts with the width and centring of the sampled N grid at each budget.")


@dataclass(frozen=True, kw_only=True)
class IsoFlopBudget:
    """One IsoFLOP profile."""

    flops: float  # the budget (geometric mean of the bin's compute)
    n_points: int
    coef: tuple  # (p0, p1, p2) of L = p0 + p1 x + p2 x^2, x = log N
    n_opt: float  # vertex, parameters (NaN when the parabola opens downward)
    d_opt: float  # C / FLOPs-per-token(N_opt), tokens
    loss_opt: float
    interior: bool  # convex and vertex inside the sampled N range: used for the exponents
    n_range: tuple = (float("nan"), float("nan"))  # sampled N
    reason: str = ""  # why it is not interior

    def to_dict(self) -> dict:
        return {"compute": self.flops, "n_opt": _finite(self.n_opt),
                "d_opt": _finite(self.d_opt), "loss_opt": _finite(self.loss_opt),
                "n_points": self.n_points, "interior": self.interior,
                **({"excluded": self.reason} if self.reason else {})}


@dataclass(frozen=True, kw_only=True)
class IsoFlopFit:
    """Approach-2 result: exponents from the interior budgets only."""

    budgets: tuple  # of IsoFlopBudget (every budget with >= 3 distinct N)
    a: float  # N_opt ~ C^a (NaN with fewer than 2 interior budgets)
    b: float  # D_opt ~ C^b
    note: str = BIAS_NOTE
    skipped: dict = field(default_factory=dict)  # budget -> reason
    verdict: identify.Verdict = field(default_factory=lambda: identify.Verdict(identified=True))
    intervals: dict = field(default_factory=dict)  # "a"/"b" -> (lo, hi) from the bootstrap
    n_boot: int = 0

    @property
    def interior(self) -> tuple:
        return tuple(b for b in self.budgets if b.interior)

    def to_dict(self) -> dict:
        return {"approach": 2, "a": _finite(self.a), "b": _finite(self.b),
                **self.verdict.to_dict(), "bias": self.note,
                "budgets": [b.to_dict() for b in self.budgets],
                "intervals": {k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()},
                "n_bootstrap": self.n_boot,
                "skipped": {f"{k:.3g}": v for k, v in self.skipped.items()}}


def _finite(x):
    return float(x) if x is not None and np.isfinite(x) else None


def bin_budgets(flops: np.ndarray, decimals: int = 1) -> np.ndarray:
    """Budget label per run: log10 C rounded to ``decimals`` (0.1 dex = 26% wide bins)."""
    return np.round(np.log10(flops), decimals)


def _tokens_at(n_opt: float, n: np.ndarray, flops: float, fpt_rows: np.ndarray | None) -> float:
    """D_opt = C / FLOPs-per-token(N_opt): FLOPs per token interpolated in log-log from the
    budget's rows (the table's compute definition), or 6 N without a tokens column."""
    if fpt_rows is None:
        return float(flops / (6.0 * n_opt))
    x, y = np.log(n), np.log(fpt_rows)
    if len(np.unique(np.round(x, 9))) < 2:
        return float(flops / np.exp(np.mean(y)))
    v, u = np.polyfit(x, y, 1)
    return float(flops / np.exp(u + v * np.log(n_opt)))


def fit_parabola(n: np.ndarray, loss: np.ndarray, flops: float,
                 fpt_rows: np.ndarray | None = None) -> IsoFlopBudget | str:
    """Parabola in log N for one budget, or the reason it can't be fitted at all."""
    x = np.log(n)
    if len(np.unique(np.round(x, 6))) < 3:
        return f"{len(np.unique(n))} distinct model size(s); a parabola needs 3"
    p2, p1, p0 = np.polyfit(x, loss, 2)
    n_range = (float(n.min()), float(n.max()))
    if p2 <= 0:
        return IsoFlopBudget(flops=float(flops), n_points=len(n), coef=(p0, p1, p2),
                             n_opt=float("nan"), d_opt=float("nan"), loss_opt=float("nan"),
                             interior=False, n_range=n_range,
                             reason="the parabola opens downward (no minimum)")
    x_opt = -p1 / (2.0 * p2)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a nearly flat
        n_opt = float(np.exp(x_opt))  # parabola puts its vertex at N = inf: reported as such
        d_opt = _tokens_at(n_opt, n, flops, fpt_rows)
    inside = bool(x.min() <= x_opt <= x.max())
    reason = "" if inside else (f"vertex N = {n_opt:.3g} outside the sampled "
                                f"[{n_range[0]:.3g}, {n_range[1]:.3g}]")
    return IsoFlopBudget(flops=float(flops), n_points=len(n), coef=(p0, p1, p2), n_opt=n_opt,
                         d_opt=d_opt,
                         loss_opt=float(p0 + p1 * x_opt + p2 * x_opt**2), interior=inside,
                         n_range=n_range, reason=reason)


def _exponents(budgets) -> tuple[float, float]:
    if len(budgets) < 2:
        return float("nan"), float("nan")
    log_c = np.log([bb.flops for bb in budgets])
    a = float(np.polyfit(log_c, np.log([bb.n_opt for bb in budgets]), 1)[0])
    b = float(np.polyfit(log_c, np.log([bb.d_opt for bb in budgets]), 1)[0])
    return a, b


def _profiles(n, loss, flops, tokens, labels):
    """Budgets (fitted profiles) and skipped {C: reason}, one per label."""
    budgets, skipped = [], {}
    for label in np.unique(labels):
        sel = labels == label
        c = float(np.exp(np.mean(np.log(flops[sel]))))
        fpt = None if tokens is None else flops[sel] / tokens[sel]
        out = fit_parabola(n[sel], loss[sel], c, fpt)
        if isinstance(out, str):
            skipped[c] = out
        else:
            budgets.append(out)
    return budgets, skipped


def fit_isoflop(n, loss, flops, *, tokens=None, decimals: int = 1, n_boot: int = 0,
                seed: int = 0, level: float = 0.95) -> IsoFlopFit:
    """Approach 2 on arrays of model size, loss and compute (one entry per run).

    ``tokens`` (optional, per run) gives the compute definition: D_opt = C / (flops/tokens
    interpolated at N_opt), which is right for MoE tables fitted on total parameters; without
    it D_opt = C / (6 N_opt). Only interior budgets (convex, vertex inside the sampled N)
    enter the exponents. ``n_boot`` > 1 adds percentile intervals for a and b from
    resampling runs within each budget.
    """
    n, loss, flops = (np.asarray(v, dtype=float) for v in (n, loss, flops))
    tokens = None if tokens is None else np.asarray(tokens, dtype=float)
    labels = bin_budgets(flops, decimals)
    budgets, skipped = _profiles(n, loss, flops, tokens, labels)
    a, b = _exponents([bb for bb in budgets if bb.interior])
    intervals = _bootstrap(n, loss, flops, tokens, labels, n_boot, seed, level)
    fit = IsoFlopFit(budgets=tuple(budgets), a=a, b=b, skipped=skipped, intervals=intervals,
                     n_boot=n_boot if n_boot > 1 else 0)
    return _with_verdict(fit)


def _bootstrap(n, loss, flops, tokens, labels, n_boot, seed, level) -> dict:
    if n_boot < 2:
        return {}
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    draws = []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        part = _profiles(n[idx], loss[idx], flops[idx], None if tokens is None else tokens[idx],
                         labels[idx])[0]
        draws.append(_exponents([bb for bb in part if bb.interior]))
    draws = np.array(draws)
    tail = 100 * (1 - level) / 2
    out = {}
    for j, name in enumerate(("a", "b")):
        ok = draws[np.isfinite(draws[:, j]), j]
        out[name] = (tuple(float(v) for v in np.percentile(ok, [tail, 100 - tail]))
                     if len(ok) > 1 else (float("nan"), float("nan")))
    return out


def _with_verdict(fit: IsoFlopFit) -> IsoFlopFit:
    issues = [identify.Issue(message=f"budget C = {bb.flops:.3g} excluded: {bb.reason}",
                             blocking=False) for bb in fit.budgets if not bb.interior]
    inner = fit.interior
    if len(inner) < 2:
        issues.append(identify.Issue(message=f"{len(inner)} interior compute budget(s) (convex "
                                     "with the minimum inside the sampled sizes); need 2"))
    else:
        if len(inner) == 2:
            issues.append(identify.Issue(message="only 2 interior budgets: the slopes have no "
                                         "residual check", blocking=False))
        ratio = max(bb.flops for bb in inner) / min(bb.flops for bb in inner)
        if ratio < 10:
            issues.append(identify.Issue(message=f"the interior budgets span only a factor of "
                                         f"{ratio:.3g} in compute (less than a decade)"))
        issues += identify.exponent(fit.a, "a") + identify.exponent(fit.b, "b")
        for name, est in (("a", fit.a), ("b", fit.b)):
            if name in fit.intervals:
                issues += identify.interval(name, est, fit.intervals[name])
    return IsoFlopFit(budgets=fit.budgets, a=fit.a, b=fit.b, note=fit.note, skipped=fit.skipped,
                      verdict=identify.Verdict.of(issues), intervals=fit.intervals,
                      n_boot=fit.n_boot)


def parabola_bias(n, flops, params: dict, *, decimals: int = 1) -> dict:
    """Approach 2 applied to noiseless losses from a Chinchilla law on the data's (N, C) grid.

    Returns {"a_true", "a_approach2", "bias"}: how far the method alone moves a on this grid.
    """
    n, flops = np.asarray(n, dtype=float), np.asarray(flops, dtype=float)
    p = params
    loss = laws.isoflop_loss(n, flops, p["E"], p["A"], p["B"], p["alpha"], p["beta"])
    fit = fit_isoflop(n, loss, flops, decimals=decimals)
    a_true = laws.compute_optimal_exponents(p["alpha"], p["beta"])[0]
    return {"a_true": float(a_true), "a_approach2": fit.a, "bias": fit.a - a_true}

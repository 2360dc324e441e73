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

from moe.analysis import laws

BIAS_NOTE = ("Approach 2 is biased: the IsoFLOP curve is asymmetric in log N, so the parabola "
             "vertex shifts with the width and centring of the sampled N grid at each budget.")


@dataclass(frozen=True, kw_only=True)
class IsoFlopBudget:
    """One IsoFLOP profile."""

    flops: float  # the budget (geometric mean of the bin's compute)
    n_points: int
    coef: tuple  # (p0, p1, p2) of L = p0 + p1 x + p2 x^2, x = log N
    n_opt: float  # vertex, parameters
    d_opt: float  # C / (6 N_opt), tokens
    loss_opt: float
    interior: bool  # vertex inside the sampled N range


@dataclass(frozen=True, kw_only=True)
class IsoFlopFit:
    """Approach-2 result."""

    budgets: tuple  # of IsoFlopBudget (convex ones with >= 3 distinct N)
    a: float  # N_opt ~ C^a (NaN with fewer than 2 budgets)
    b: float  # D_opt ~ C^b
    note: str = BIAS_NOTE
    skipped: dict = field(default_factory=dict)  # budget -> reason

    def to_dict(self) -> dict:
        return {"a": _finite(self.a), "b": _finite(self.b), "note": self.note,
                "budgets": [{"flops": b.flops, "n_points": b.n_points, "n_opt": b.n_opt,
                             "d_opt": b.d_opt, "loss_opt": b.loss_opt,
                             "interior": b.interior} for b in self.budgets],
                "skipped": {f"{k:.3g}": v for k, v in self.skipped.items()}}


def _finite(x):
    return float(x) if np.isfinite(x) else None


def bin_budgets(flops: np.ndarray, decimals: int = 1) -> np.ndarray:
    """Budget label per run: log10 C rounded to ``decimals`` (0.1 dex = 26% wide bins)."""
    return np.round(np.log10(flops), decimals)


def fit_parabola(n: np.ndarray, loss: np.ndarray, flops: float) -> IsoFlopBudget | str:
    """Parabola in log N for one budget, or the reason it can't be used."""
    x = np.log(n)
    if len(np.unique(np.round(x, 6))) < 3:
        return f"{len(np.unique(n))} distinct model size(s); a parabola needs 3"
    p2, p1, p0 = np.polyfit(x, loss, 2)
    if p2 <= 0:
        return "loss is not convex in log N at this budget (no minimum)"
    x_opt = -p1 / (2.0 * p2)
    n_opt = float(np.exp(x_opt))
    return IsoFlopBudget(flops=float(flops), n_points=len(n), coef=(p0, p1, p2), n_opt=n_opt,
                         d_opt=float(flops / (6.0 * n_opt)),
                         loss_opt=float(p0 + p1 * x_opt + p2 * x_opt**2),
                         interior=bool(x.min() <= x_opt <= x.max()))


def fit_isoflop(n, loss, flops, *, decimals: int = 1) -> IsoFlopFit:
    """Approach 2 on arrays of model size, loss and compute (one entry per run)."""
    n, loss, flops = (np.asarray(v, dtype=float) for v in (n, loss, flops))
    labels = bin_budgets(flops, decimals)
    budgets, skipped = [], {}
    for label in np.unique(labels):
        sel = labels == label
        c = float(np.exp(np.mean(np.log(flops[sel]))))
        out = fit_parabola(n[sel], loss[sel], c)
        if isinstance(out, str):
            skipped[c] = out
        else:
            budgets.append(out)
    a = b = float("nan")
    if len(budgets) >= 2:
        log_c = np.log([bb.flops for bb in budgets])
        a = float(np.polyfit(log_c, np.log([bb.n_opt for bb in budgets]), 1)[0])
        b = float(np.polyfit(log_c, np.log([bb.d_opt for bb in budgets]), 1)[0])
    return IsoFlopFit(budgets=tuple(budgets), a=a, b=b, skipped=skipped)


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

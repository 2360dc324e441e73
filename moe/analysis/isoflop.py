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

from dataclasses import dataclass, field, replace

import numpy as np

from moe.analysis import identify, laws
from moe.errors import BadInput

BIAS_NOTE = ("Approach 2 is biased: the IsoFLOP curve is asymmetric in log N, so the parabola "
             "vertex shifts with the width and centring of the sampled N grid at each budget.")
WINDOW_KINDS = ("all", "loss", "nearest")


@dataclass(frozen=True, kw_only=True)
class Window:
    """Which points of a budget its parabola is fitted on.

    ``all``: every point. ``loss``: the sizes whose loss is within ``width`` (relative) of the
    budget's lowest loss (0.03 keeps sizes at most 3% above it). ``nearest``: the ``width``
    sizes nearest (in log N) to the size with the lowest loss. A parabola needs 3 sizes, so a
    window that keeps fewer takes the 3 nearest instead. Near the minimum the IsoFLOP curve
    is close to a parabola, so its asymmetry (the source of Approach 2's bias) matters less.
    """

    kind: str = "all"
    width: float = 0.0

    def __post_init__(self):
        if self.kind not in WINDOW_KINDS:
            raise BadInput(f"window kind {self.kind!r} must be one of {', '.join(WINDOW_KINDS)}")
        if self.kind == "loss" and not self.width > 0:
            raise BadInput(f"a loss window needs a width > 0 (e.g. loss:0.03), got {self.width}")
        if self.kind == "nearest" and (self.width < 3 or self.width != int(self.width)):
            raise BadInput(f"a nearest window needs a whole number of sizes >= 3 (e.g. "
                             f"nearest:5), got {self.width:g}")

    @classmethod
    def parse(cls, text: str) -> Window:
        """'all', 'loss:0.03' or 'nearest:5' (the `moe fit --window` syntax)."""
        kind, _, width = str(text).strip().partition(":")
        if kind == "all" and not width:
            return cls()
        try:
            value = float(width)
        except ValueError:
            raise BadInput(f"--window {text!r}: use all, loss:FRACTION or nearest:K") from None
        return cls(kind=kind, width=value)

    @property
    def label(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.width:g}"

    def select(self, n: np.ndarray, loss: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows (of one budget) the parabola is fitted on."""
        if self.kind == "all":
            return np.ones(len(n), dtype=bool)
        x = np.round(np.log(n), 9)
        sizes = np.unique(x)
        best = np.array([loss[x == s].min() for s in sizes])
        centre = sizes[np.argmin(best)]
        order = sizes[np.argsort(np.abs(sizes - centre), kind="stable")]
        if self.kind == "nearest":
            keep = order[:int(self.width)]
        else:
            keep = sizes[best <= best.min() * (1.0 + self.width)]
            if len(keep) < 3:
                keep = order[:3]
        return np.isin(x, keep)


# The default, chosen by measured bias on synthetic IsoFLOP grids (docs/laws.md, "Approach
# 2 windows"; benchmarks/isoflop_windows.py prints the table).
DEFAULT_WINDOW = Window(kind="loss", width=0.1)


@dataclass(frozen=True, kw_only=True)
class IsoFlopBudget:
    """One IsoFLOP profile."""

    flops: float  # the budget (geometric mean of the bin's compute)
    n_points: int  # rows in the budget
    coef: tuple  # (p0, p1, p2) of L = p0 + p1 x + p2 x^2, x = log N
    n_opt: float  # vertex, parameters (NaN when the parabola opens downward)
    d_opt: float  # C / FLOPs-per-token(N_opt), tokens
    loss_opt: float
    interior: bool  # convex and vertex inside the sampled N range: used for the exponents
    n_range: tuple = (float("nan"), float("nan"))  # sampled N (inside the window)
    reason: str = ""  # why it is not interior
    n_used: int = 0  # rows inside the window (the parabola's points)

    def to_dict(self) -> dict:
        return {"compute": self.flops, "n_opt": _finite(self.n_opt),
                "d_opt": _finite(self.d_opt), "loss_opt": _finite(self.loss_opt),
                "n_points": self.n_points, "n_in_window": self.n_used or self.n_points,
                "interior": self.interior,
                **({"excluded": self.reason} if self.reason else {})}


@dataclass(frozen=True, kw_only=True)
class IsoFlopFit:
    """Approach-2 result: N_opt = G_N C^a and D_opt = G_D C^b from the interior budgets."""

    budgets: tuple  # of IsoFlopBudget (every budget with >= 3 distinct N)
    a: float  # N_opt ~ C^a (NaN with fewer than 2 interior budgets)
    b: float  # D_opt ~ C^b
    n_prefactor: float = float("nan")  # G_N in N_opt = G_N C^a (C in FLOPs)
    d_prefactor: float = float("nan")  # G_D in D_opt = G_D C^b
    note: str = BIAS_NOTE
    skipped: dict = field(default_factory=dict)  # budget -> reason
    verdict: identify.Verdict = field(default_factory=lambda: identify.Verdict(identified=True))
    intervals: dict = field(default_factory=dict)  # a/b/n_prefactor/d_prefactor -> (lo, hi)
    n_boot: int = 0
    window: Window = field(default_factory=Window)
    bias: dict = field(default_factory=dict)  # the method's bias on this grid (parabola_bias)

    @property
    def interior(self) -> tuple:
        return tuple(b for b in self.budgets if b.interior)

    def to_dict(self) -> dict:
        return {"approach": 2, "a": _finite(self.a), "b": _finite(self.b),
                "n_prefactor": _finite(self.n_prefactor),
                "d_prefactor": _finite(self.d_prefactor),
                "allocation": "N_opt = n_prefactor * C^a, D_opt = d_prefactor * C^b (C in FLOPs)",
                **self.verdict.to_dict(), "bias": self.note, "window": self.window.label,
                "method_bias": dict(self.bias),
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


def _allocation_fit(budgets) -> tuple[float, float, float, float]:
    """(a, b, G_N, G_D) of log N_opt = a log C + log G_N and log D_opt = b log C + log G_D."""
    if len(budgets) < 2:
        return (float("nan"),) * 4
    log_c = np.log([bb.flops for bb in budgets])
    a, log_gn = np.polyfit(log_c, np.log([bb.n_opt for bb in budgets]), 1)
    b, log_gd = np.polyfit(log_c, np.log([bb.d_opt for bb in budgets]), 1)
    with np.errstate(over="ignore"):
        return float(a), float(b), float(np.exp(log_gn)), float(np.exp(log_gd))


def _exponents(budgets) -> tuple[float, float]:
    return _allocation_fit(budgets)[:2]


def _profiles(n, loss, flops, tokens, labels, window: Window = Window()):
    """Budgets (fitted profiles, each on its window) and skipped {C: reason}, one per label."""
    budgets, skipped = [], {}
    for label in np.unique(labels):
        sel = np.flatnonzero(labels == label)
        c = float(np.exp(np.mean(np.log(flops[sel]))))
        if len(np.unique(np.round(np.log(n[sel]), 6))) >= 3:
            sel = sel[window.select(n[sel], loss[sel])]
        fpt = None if tokens is None else flops[sel] / tokens[sel]
        out = fit_parabola(n[sel], loss[sel], c, fpt)
        if isinstance(out, str):
            skipped[c] = out
        else:
            budgets.append(replace(out, n_points=int(np.sum(labels == label)),
                                   n_used=len(sel)))
    return budgets, skipped


def fit_isoflop(n, loss, flops, *, tokens=None, decimals: int = 1, n_boot: int = 0,
                seed: int = 0, level: float = 0.95, window: Window | None = None,
                bias_params: dict | None = None, bias_source: str = "") -> IsoFlopFit:
    """Approach 2 on arrays of model size, loss and compute (one entry per run).

    ``tokens`` (optional, per run) gives the compute definition: D_opt = C / (flops/tokens
    interpolated at N_opt), which is right for MoE tables fitted on total parameters; without
    it D_opt = C / (6 N_opt). Each budget's parabola is fitted on its ``window`` (default
    :data:`DEFAULT_WINDOW`); only interior budgets (convex, vertex inside the sampled N)
    enter a, b and the prefactors. ``n_boot`` > 1 adds percentile intervals from resampling
    runs within each budget. ``bias_params`` (a Chinchilla law) sets the law from which the
    method's bias on this grid is measured (:func:`parabola_bias`); the caller says where it
    came from in ``bias_source``. Without it no bias is computed here (see
    :func:`moe.analysis.records.approach2_record`, which always supplies one).
    """
    n, loss, flops = (np.asarray(v, dtype=float) for v in (n, loss, flops))
    tokens = None if tokens is None else np.asarray(tokens, dtype=float)
    window = DEFAULT_WINDOW if window is None else window
    labels = bin_budgets(flops, decimals)
    budgets, skipped = _profiles(n, loss, flops, tokens, labels, window)
    a, b, g_n, g_d = _allocation_fit([bb for bb in budgets if bb.interior])
    intervals = _bootstrap(n, loss, flops, tokens, labels, window, n_boot, seed, level)
    bias = {}
    if bias_params is not None:
        bias = {"law": bias_source, **parabola_bias(n, flops, bias_params, tokens=tokens,
                                                    decimals=decimals, window=window)}
    fit = IsoFlopFit(budgets=tuple(budgets), a=a, b=b, n_prefactor=g_n, d_prefactor=g_d,
                     skipped=skipped, intervals=intervals, n_boot=n_boot if n_boot > 1 else 0,
                     window=window, bias=bias)
    return _with_verdict(fit)


ALLOCATION_NAMES = ("a", "b", "n_prefactor", "d_prefactor")


def _bootstrap(n, loss, flops, tokens, labels, window, n_boot, seed, level) -> dict:
    if n_boot < 2:
        return {}
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    draws = []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        part = _profiles(n[idx], loss[idx], flops[idx], None if tokens is None else tokens[idx],
                         labels[idx], window)[0]
        draws.append(_allocation_fit([bb for bb in part if bb.interior]))
    draws = np.array(draws)
    tail = 100 * (1 - level) / 2
    out = {}
    for j, name in enumerate(ALLOCATION_NAMES):
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
    issues += _bias_issues(fit)
    return replace(fit, verdict=identify.Verdict.of(issues))


BIAS_TOLERANCE = 0.05  # relative bias of a on the table's own grid that blocks the verdict


def _bias_issues(fit: IsoFlopFit) -> list:
    """The method's own bias on this grid: blocking when a is off by more than 5% (relative)
    or by more than its bootstrap interval's half-width, whichever is larger."""
    rel = fit.bias.get("relative")
    if rel is None or not np.isfinite(rel):
        return []
    limit = BIAS_TOLERANCE
    if "a" in fit.intervals and np.isfinite(fit.a) and fit.a:
        lo, hi = fit.intervals["a"]
        limit = max(limit, 0.5 * (hi - lo) / abs(fit.a))
    if abs(rel) <= limit:
        return []
    return [identify.Issue(message=f"on this table's grid the method moves a by "
                           f"{100 * rel:+.1f}% (noiseless data from {fit.bias.get('law')}); "
                           f"narrow the window (--window) or sample each budget's minimum "
                           f"more densely")]


def parabola_bias(n, flops, params: dict, *, tokens=None, decimals: int = 1,
                  window: Window = Window()) -> dict:
    """Approach 2 applied to noiseless losses from a Chinchilla law on the data's (N, C) grid.

    D per row is ``tokens`` when given (the table's compute definition), else C / (6 N).
    Returns {"a_true", "a_approach2", "bias", "relative"}: how far the method alone moves a
    on this grid with this window. a_true uses the FLOPs-per-token exponent of the table
    (C ~ N^v D), as the allocation does.
    """
    n, flops = np.asarray(n, dtype=float), np.asarray(flops, dtype=float)
    d = flops / (6.0 * n) if tokens is None else np.asarray(tokens, dtype=float)
    v = 1.0
    if tokens is not None and len(np.unique(np.round(np.log(n), 9))) > 1:
        v = float(np.polyfit(np.log(n), np.log(flops / d), 1)[0])
    p = params
    loss = laws.chinchilla(n, d, p["E"], p["A"], p["B"], p["alpha"], p["beta"])
    fit = fit_isoflop(n, loss, flops, tokens=tokens, decimals=decimals, window=window)
    a_true = laws.compute_optimal_exponents_general(p["alpha"], p["beta"], v)[0]
    bias = fit.a - a_true
    return {"a_true": float(a_true), "a_approach2": _finite(fit.a),
            "bias": _finite(bias), "relative": _finite(bias / a_true)}

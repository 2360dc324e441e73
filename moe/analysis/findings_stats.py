"""The statistics behind the paper's findings, each a function of bootstrap count weights.

Every builder takes the finding's runs and returns ``stat(w_BN) -> (B,)``: the statistic
for each row of weights (unit weights: the data; counts: a resample; a zero: a jackknife
deletion). All fits are closed-form weighted least squares (:mod:`moe.analysis.resample`),
so 1000s of resamples are one vectorised call.

x = log2(E/k) = -log2(1 - s) throughout: the sampled sparsities 0, 1/2, 3/4, ... are evenly
spaced in x, and a quadratic in x is the U-shape the paper draws on a log axis.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe.analysis.resample import group_sums, wls
from moe.analysis.tables import PRETRAIN_LOSS

SPLINE_KNOTS = 6  # natural cubic spline of reasoning in pre-training loss: <= 6 knots, 6 dof


def log_ratio(sparsity) -> np.ndarray:
    """x = log2(E/k) = -log2(1 - s): sparsities 0, 1/2, 3/4, 7/8 ... evenly spaced."""
    return 0.0 - np.log2(1.0 - np.asarray(sparsity, dtype=float))  # 0.0 -: no -0.0


def to_sparsity(x):
    return 1.0 - 2.0 ** (-np.asarray(x, dtype=float))


def onehot(labels) -> tuple[np.ndarray, list]:
    """(N, G) indicator matrix of the labels, and the labels in column order."""
    cats = pd.Categorical(labels)
    return np.eye(len(cats.categories))[cats.codes], list(cats.categories)


def natural_spline_basis(v: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Natural cubic spline basis (Hastie, Tibshirani & Friedman, ESL eq. 5.4-5.5): 1, v and
    K - 2 truncated-cubic differences; linear beyond the boundary knots, so a resample
    whose runs end before the last knot cannot swing the curve."""
    k_last = knots[-1]

    def d(k):
        return (np.maximum(v - k, 0) ** 3 - np.maximum(v - k_last, 0) ** 3) / (k_last - k)

    cols = [np.ones_like(v), v] + [d(k) - d(knots[-2]) for k in knots[:-2]]
    return np.column_stack(cols)


def loss_curve_basis(pre_N: np.ndarray) -> np.ndarray:
    """The smooth function of pre-training loss that reasoning is first fitted on: a natural
    cubic spline with knots at quantiles of the loss, fixed from the data so every
    resample fits the same family (a straight line in L is one of its members)."""
    v = (pre_N - pre_N.min()) / max(np.ptp(pre_N), 1e-12)
    n_knots = min(SPLINE_KNOTS, len(np.unique(v)) // 5)  # >= 5 runs per knot: resamples fit
    knots = np.unique(np.quantile(v, np.linspace(0, 1, max(n_knots, 2))))
    basis = (np.column_stack([np.ones_like(v), v]) if len(knots) < 3
             else natural_spline_basis(v, knots))
    # the same column space, orthonormal: the truncated cubics of clustered losses (one
    # cluster per token budget) are nearly collinear, and resamples must not read as singular
    return np.linalg.qr(basis)[0]


# --- memorization and top-k: one linear model each -----------------------------------------

def memo_share_stat(rows: pd.DataFrame):
    """Signed share of sparsity in what moves memorization loss: with memorization = a + b L
    + g s, S = g x range(s) and P = max(b, 0) x range(L), the share S / (|S| + P); +-1 when
    memorization does not fall with pre-training loss. Signed, so the statistic is smooth
    at g = 0 and its bootstrap is not piled against a bound (the old |S| share was)."""
    pre, s = rows[PRETRAIN_LOSS].to_numpy(float), rows["sparsity"].to_numpy(float)
    x_NP = np.column_stack([np.ones(len(pre)), pre, s])
    y_N = rows["memorization"].to_numpy(float)
    range_s, range_p = np.ptp(s), np.ptp(pre)

    def stat(w_BN):
        c_BP = wls(x_NP, y_N, w_BN)
        move_s, move_p = c_BP[:, 2] * range_s, np.maximum(c_BP[:, 1] * range_p, 0.0)
        den = np.abs(move_s) + move_p
        return np.where(den > 0, move_s / np.where(den > 0, den, 1.0), np.nan)
    return stat


def memo_loss_slope(rows: pd.DataFrame) -> float:
    """b in memorization = a + b L + g s (does memorization fall with pre-training loss?)."""
    pre, s = rows[PRETRAIN_LOSS].to_numpy(float), rows["sparsity"].to_numpy(float)
    x_NP = np.column_stack([np.ones(len(pre)), pre, s])
    return float(wls(x_NP, rows["memorization"].to_numpy(float), np.ones((1, len(pre))))[0, 1])


def topk_stat(rows: pd.DataFrame):
    """g in reasoning = f(L) + g log2(k), f the natural spline of :func:`loss_curve_basis`:
    reasoning loss per doubling of k at equal pre-training loss. A straight line in L would
    call the curvature of reasoning in L a top-k effect whenever k moves L."""
    k = np.log2(rows["top_k"].to_numpy(float))
    x_NP = np.column_stack([loss_curve_basis(rows[PRETRAIN_LOSS].to_numpy(float)), k])
    y_N = rows["reasoning"].to_numpy(float)
    return lambda w_BN: wls(x_NP, y_N, w_BN)[:, -1]


# --- reasoning fans out at equal pre-training loss -----------------------------------------

def fanout_stat(rows: pd.DataFrame, in_groups: np.ndarray):
    """Slope, within fixed-active-parameter groups, of the reasoning residual on x.

    Stage 1: reasoning = f(L) + r, f a natural cubic spline of pre-training loss fitted on
    every run (:func:`loss_curve_basis`), so r is what pre-training loss does not explain.
    Stage 2: r on x with one intercept per group (only runs in groups of 2+ sparsities,
    ``in_groups``), so width, k and budget cannot pass for sparsity. Positive: at equal
    pre-training loss, sparser models reason worse (the paper's fan-out, denser better).
    """
    p_NP = loss_curve_basis(rows[PRETRAIN_LOSS].to_numpy(float))
    y_N = rows["reasoning"].to_numpy(float)
    x_N = np.where(in_groups, log_ratio(rows["sparsity"]), 0.0)
    g_NG, _ = onehot(np.where(in_groups, rows["group"].astype(str), "-"))
    g_NG = g_NG * in_groups[:, None]

    def stat(w_BN):
        r_BN = y_N - wls(p_NP, y_N, w_BN) @ p_NP.T
        s, sx, sxx = (group_sums(w_BN, v, g_NG) for v in (1.0, x_N, x_N * x_N))
        sr, sxr = group_sums(w_BN, r_BN, g_NG), group_sums(w_BN, r_BN * x_N, g_NG)
        safe = np.where(s > 0, s, 1.0)
        num, den = sxr - sx * sr / safe, sxx - sx * sx / safe
        den_B = den.sum(axis=1)
        return np.where(den_B > 0, num.sum(axis=1) / np.where(den_B > 0, den_B, 1.0), np.nan)
    return stat


def fanout_residuals(rows: pd.DataFrame) -> np.ndarray:
    """Stage 1's residuals on the data (for the figure)."""
    p_NP = loss_curve_basis(rows[PRETRAIN_LOSS].to_numpy(float))
    y_N = rows["reasoning"].to_numpy(float)
    return y_N - (wls(p_NP, y_N, np.ones((1, len(y_N)))) @ p_NP.T)[0]


def partial_r2(target_N: np.ndarray, cov_NP: np.ndarray, groups) -> float:
    """Share of the within-group variance of ``target`` explained by ``cov`` (plus group
    intercepts): 1 means the target is a function of the covariates within groups."""
    g_NG, _ = onehot(groups)
    base = target_N - g_NG @ np.linalg.lstsq(g_NG, target_N, rcond=None)[0]
    full_NP = np.column_stack([g_NG, cov_NP])
    resid = target_N - full_NP @ np.linalg.lstsq(full_NP, target_N, rcond=None)[0]
    tss = float(base @ base)
    return float(1.0 - resid @ resid / tss) if tss > 0 else 1.0


# --- optima in sparsity at fixed active parameters -----------------------------------------

def _moments(w_BN, x_N, y_N, g_NG):
    """Within-group centred weighted moments: (Vxx, Vxq, Vqq, Vxy, Vqy), q = x^2, each (B, G)."""
    q_N = x_N * x_N
    s = group_sums(w_BN, 1.0, g_NG)
    safe = np.where(s > 0, s, 1.0)
    raw = {k: group_sums(w_BN, v, g_NG) for k, v in (("x", x_N), ("q", q_N), ("y", y_N))}

    def cov(a, b, ab):
        return group_sums(w_BN, ab, g_NG) - raw[a] * raw[b] / safe
    return (cov("x", "x", x_N * x_N), cov("x", "q", x_N * q_N), cov("q", "q", q_N * q_N),
            cov("x", "y", x_N * y_N), cov("q", "y", q_N * y_N))


def _argmin_quadratic(c1, c2, lo, hi):
    """Minimiser of c1 x + c2 x^2 over [lo, hi] (broadcast): the vertex when convex and
    inside, else the lower edge value."""
    def f(v):
        return c1 * v + c2 * v * v
    edge = np.where(f(lo) <= f(hi), lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = -c1 / (2 * c2)
    inside = (c2 > 0) & (vertex > lo) & (vertex < hi)
    out = np.where(inside, vertex, edge)
    return np.where(np.isfinite(c1) & np.isfinite(c2), out, np.nan)


def _cells(rows: pd.DataFrame):
    """(x per run, (N, C) one-hot of (group, x) cells, each cell's group index and x)."""
    x_N = log_ratio(rows["sparsity"])
    labels = [f"{g}|{v:.9g}" for g, v in zip(rows["group"].astype(str), x_N, strict=True)]
    c_NC, names = onehot(labels)
    groups = sorted({n.rsplit("|", 1)[0] for n in names})
    cell_g = np.array([groups.index(n.rsplit("|", 1)[0]) for n in names])
    cell_x = np.array([float(n.rsplit("|", 1)[1]) for n in names])
    return x_N, c_NC, cell_g, cell_x, groups


def argmin_by_group(y_N, w_BN, c_NC, cell_g, cell_x) -> np.ndarray:
    """(B, G): per resample, each group's sampled x whose weighted mean y is lowest (levels
    a resample leaves empty are not candidates)."""
    sw_BC, sy_BC = w_BN @ c_NC, (w_BN * y_N) @ c_NC
    mean_BC = np.where(sw_BC > 0, sy_BC / np.where(sw_BC > 0, sw_BC, 1.0), np.inf)
    out = np.full((len(w_BN), cell_g.max() + 1), np.nan)
    for g in range(out.shape[1]):
        cols = np.flatnonzero(cell_g == g)
        best = np.argmin(mean_BC[:, cols], axis=1)
        out[:, g] = cell_x[cols][best]
    return out


def optimum_gap_stat(rows: pd.DataFrame):
    """Mean over groups of (reasoning-optimal x) - (loss-optimal x), each the sampled
    sparsity with the lowest mean loss in its group: negative when reasoning is best at a
    denser model than pre-training loss is (the paper's dissociation).

    The optima are the observed minima, not the vertices of fitted curves: a quadratic
    fitted to reasoning = h(L(x)) and one fitted to L(x) put their vertices apart whenever
    h is curved and L is not a parabola, so a fitted gap is "found" on a table whose
    reasoning is a pure function of its loss; observed minima coincide there.
    """
    _, c_NC, cell_g, cell_x, _ = _cells(rows)
    reason, loss = rows["reasoning"].to_numpy(float), rows[PRETRAIN_LOSS].to_numpy(float)

    def stat(w_BN, reason=reason):
        gap_BG = (argmin_by_group(reason, w_BN, c_NC, cell_g, cell_x)
                  - argmin_by_group(loss, w_BN, c_NC, cell_g, cell_x))
        return gap_BG.mean(axis=1)
    return stat


def null_gaps(rows: pd.DataFrame, *, n_sims: int = 1000, seed: int = 0) -> np.ndarray:
    """The gap on ``n_sims`` tables without dissociation but with these runs' noise:
    reasoning = f(L) (the spline of :func:`loss_curve_basis`) plus the stage-1 residuals
    permuted among the runs of each group. Noise alone moves a reasoning minimum off a
    loss minimum at an edge of the sampled sparsities, always inwards, so the gap of a
    confound is not centred on 0 and a bootstrap over runs cannot see that; this
    permutation distribution can. Under a real dissociation the residuals carry part of
    the signal, so the test errs towards "not resolved"."""
    resid_N = fanout_residuals(rows)
    fitted_N = rows["reasoning"].to_numpy(float) - resid_N
    rng = np.random.default_rng([seed, 1])
    y_SN = np.empty((n_sims, len(rows)))
    for label in rows["group"].unique():
        idx = np.flatnonzero(rows["group"].to_numpy() == label)
        perm = np.argsort(rng.random((n_sims, len(idx))), axis=1)
        y_SN[:, idx] = fitted_N[idx] + resid_N[idx][perm]
    return optimum_gap_stat(rows)(np.ones_like(y_SN), reason=y_SN)


def group_optima(rows: pd.DataFrame) -> pd.DataFrame:
    """Per group: the loss- and the reasoning-optimal x (the gap statistic's parts)."""
    _, c_NC, cell_g, cell_x, groups = _cells(rows)
    one = np.ones((1, len(rows)))
    out = {"group": groups}
    for name, col in (("loss", PRETRAIN_LOSS), ("reasoning", "reasoning")):
        out[f"x_{name}"] = argmin_by_group(rows[col].to_numpy(float), one, c_NC, cell_g,
                                           cell_x)[0]
    return pd.DataFrame(out)


def pooled_optimum_stat(rows: pd.DataFrame, col: str):
    """x minimising y = a_g + c1 x + c2 x^2 (one intercept per group, shared c1 and c2) over
    the sampled range: the old ``reasoning_optimal_sparsity``, now descriptive."""
    x_N = log_ratio(rows["sparsity"])
    g_NG, _ = onehot(rows["group"].astype(str))
    y_N = rows[col].to_numpy(float)
    lo, hi = float(x_N.min()), float(x_N.max())

    def stat(w_BN):
        vxx, vxq, vqq, vxy, vqy = (m.sum(axis=1) for m in _moments(w_BN, x_N, y_N, g_NG))
        det = vxx * vqq - vxq * vxq
        ok = det > 1e-12 * np.maximum(vxx * vqq, 1e-300)
        det = np.where(ok, det, 1.0)
        c1 = np.where(ok, (vqq * vxy - vxq * vqy) / det, np.nan)
        c2 = np.where(ok, (vxx * vqy - vxq * vxy) / det, np.nan)
        return _argmin_quadratic(c1, c2, lo, hi)
    return stat


def sparsity_moves_p(rows: pd.DataFrame, col: str) -> float:
    """p-value of the F-test that x moves ``col`` within groups: group intercepts alone
    against the model of :func:`group_optima_stat` (a slope per group, shared curvature).
    Without such an effect an optimum in sparsity is noise, not a place."""
    from scipy.stats import f as f_dist

    x_N = log_ratio(rows["sparsity"])
    g_NG, _ = onehot(rows["group"].astype(str))
    y_N = rows[col].to_numpy(float)

    def rss(design):
        resid = y_N - design @ np.linalg.lstsq(design, y_N, rcond=None)[0]
        return float(resid @ resid), np.linalg.matrix_rank(design)
    rss0, p0 = rss(g_NG)
    rss1, p1 = rss(np.column_stack([g_NG, g_NG * x_N[:, None], x_N * x_N]))
    df1, df2 = p1 - p0, len(y_N) - p1
    if df1 < 1 or df2 < 1 or rss1 <= 0:
        return float("nan")
    return float(f_dist.sf(((rss0 - rss1) / df1) / (rss1 / df2), df1, df2))

"""Numerical core of the Approach-3 fitter: the log-space LSE model with K power-law terms.

Model (Hoffmann et al. 2022, Approach 3, in the parameterisation of Besiroglu et al. 2024,
arXiv 2404.10102), for K input columns X_1..X_K (K=2: N and D; K=1: N only):

    log L_hat = LSE(c_1 - g_1 log X_1, ..., c_K - g_K log X_K, e)
    L_hat     = E + sum_j A_j X_j^-g_j,   A_j = exp(c_j), E = exp(e)

theta = (c_1..c_K, e, g_1..g_K). Objective: sum_i w_i Huber_delta(log L_i - log L_hat_i) with
Huber_delta(r) = r^2/2 for |r| <= delta, delta (|r| - delta/2) otherwise (scipy.special.huber).

Global search (see :func:`global_fit`): (1) every start of the Epoch grid is evaluated in one
vectorised pass; (2) variable projection over the exponents: on a dense exponent grid the
linear coefficients (E, A_j) are solved in closed form by batched iteratively-reweighted least
squares on relative residuals (which approximate log residuals); (3) the best distinct
candidates of both are refined with L-BFGS-B using the analytic gradient.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from scipy.optimize import least_squares, minimize

from moe.errors import BadInput

HUBER_DELTA = 1e-3
_TINY = 1e-12
# Epoch's grid (Besiroglu et al. 2024): exponents {0, .5, .., 2}, e {-1, -.5, .., 1},
# log-coefficients {0, 5, .., 25}: 5 * 5 * 5 * 6 * 6 = 4,500 starts for K = 2.
EPOCH_EXPONENTS = np.arange(0.0, 2.01, 0.5)
EPOCH_E = np.arange(-1.0, 1.01, 0.5)
EPOCH_LOGCOEF = np.arange(0.0, 25.1, 5.0)


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss, elementwise."""
    absr = np.abs(r)
    return np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))



def _log_sum_exp_terms(theta, log_x):
    """log L_hat (n,) and the softmax weights p (n, K+1) of its terms, for theta =
    (c_1..c_K, e, g_1..g_K): term j is c_j - g_j log X_j, the last term is e."""
    k = log_x.shape[1]
    z = np.empty((log_x.shape[0], k + 1))
    z[:, :k] = theta[:k] - log_x * theta[k + 1:]
    z[:, k] = theta[k]
    zmax = z.max(axis=1)
    p = np.exp(z - zmax[:, None])
    total = p.sum(axis=1)
    p /= total[:, None]
    return zmax + np.log(total), p

def objective_and_grad(theta, log_x, log_y, weights, delta=HUBER_DELTA):
    """Weighted Huber objective on log residuals and its analytic gradient w.r.t. theta.

    log_x: (n, K) logs of the inputs; log_y: (n,) log losses; weights: (n,) (bootstrap counts).
    d LSE / d c_j = p_j, d LSE / d e = p_0, d LSE / d g_j = -p_j log X_j with p the softmax.
    """
    k = log_x.shape[1]
    log_total, p = _log_sum_exp_terms(theta, log_x)
    r = log_y - log_total
    wpsi = weights * np.clip(r, -delta, delta)
    grad = np.empty_like(theta)
    grad[:k + 1] = -(wpsi @ p)
    grad[k + 1:] = wpsi @ (p[:, :k] * log_x)
    return float(weights @ huber(r, delta)), grad


def batch_log_sum_exp(thetas, log_x, *, with_weights: bool = False):
    """:func:`_log_sum_exp_terms` for many thetas (G, 2K+1) at once: log L_hat (G, n), and
    with ``with_weights`` the softmax weights of its terms (G, n, K+1). The K+1 terms are
    kept as separate (G, n) arrays: numpy's reductions over a last axis of 2-4 elements cost
    several times the elementwise maximum and sum of the same values (same order, same
    results)."""
    k = log_x.shape[1]
    terms = [thetas[:, j, None] - log_x[:, j] * thetas[:, k + 1 + j, None] for j in range(k)]
    terms.append(np.broadcast_to(thetas[:, k, None], terms[0].shape))
    t_max = functools.reduce(np.maximum, terms)
    exps = [np.exp(t - t_max) for t in terms]
    total = functools.reduce(np.add, exps)
    if not with_weights:
        return t_max + np.log(total)
    return t_max + np.log(total), np.stack(exps, axis=2) / total[:, :, None]


def batch_objective(thetas, log_x, log_y, weights, delta=HUBER_DELTA, chunk=512):
    """Objective for many parameter vectors at once; thetas (G, 2K+1) -> (G,)."""
    out = np.empty(len(thetas))
    for s in range(0, len(thetas), chunk):
        lse = batch_log_sum_exp(thetas[s:s + chunk], log_x)
        out[s:s + chunk] = huber(log_y[None] - lse, delta) @ weights
    return out


def epoch_grid(k: int) -> np.ndarray:
    """Epoch's grid of starting points for K terms, as thetas (G, 2K+1)."""
    rows = itertools.product(*([EPOCH_LOGCOEF] * k), EPOCH_E, *([EPOCH_EXPONENTS] * k))
    return np.array(list(rows), dtype=float)


def _subsets(m: int) -> list[np.ndarray]:
    """Every non-empty subset of range(m), as index arrays (the NNLS active sets)."""
    return [np.array(c) for r in range(1, m + 1) for c in itertools.combinations(range(m), r)]


def batch_nnls(gram, rhs):
    """Exact non-negative least squares for many small problems at once.

    min_c c'Gc - 2 c'r subject to c >= 0, for G (G, m, m) and r (G, m) with m <= 4: the
    optimum is the unconstrained solution on its support, so every support is solved and
    the best feasible one kept (2^m - 1 tiny solves, all vectorised). Returns (G, m).
    """
    n_prob, m = rhs.shape
    best = np.zeros((n_prob, m))
    best_val = np.zeros(n_prob)  # c = 0 is always feasible, with value 0
    for idx in _subsets(m):
        sub_g = gram[:, idx[:, None], idx[None, :]]
        with np.errstate(all="ignore"):
            try:
                sol = np.linalg.solve(sub_g, rhs[:, idx, None])[:, :, 0]
            except np.linalg.LinAlgError:
                sol = np.stack([np.linalg.lstsq(g, r, rcond=None)[0]
                                for g, r in zip(sub_g, rhs[:, idx], strict=True)])
        value = -np.einsum("gi,gi->g", sol, rhs[:, idx])  # c'Gc - 2c'r = -c'r at the LS optimum
        better = np.all(sol >= 0, axis=1) & np.isfinite(value) & (value < best_val)
        best[better] = 0.0
        best[np.ix_(better, idx)] = sol[better]
        best_val = np.where(better, value, best_val)
    return best


def varpro_candidates(exponents, log_x, log_y, weights, delta=HUBER_DELTA, n_irls=4):
    """Variable projection: for each exponent vector g (G, K) solve the coefficients.

    With g fixed, L_hat = E + sum_j A_j X_j^-g_j is linear in (E, A); the relative residual
    1 - L_hat/L ~ log L - log L_hat, so a Huber-weighted non-negative least-squares fit
    (IRLS with weights min(1, delta/|r|), exact NNLS each step) approximates the inner
    problem. Zero coefficients are raised to a tiny positive value (the LSE
    parameterisation needs them > 0). Returns (thetas (G, 2K+1), objectives (G,)).
    """
    k = log_x.shape[1]
    y = np.exp(log_y)
    basis = np.empty((len(exponents), k + 1, log_x.shape[0]))  # (G, K+1, n)
    basis[:, 0, :] = 1.0
    basis[:, 1:, :] = np.exp(-exponents[:, :, None] * log_x.T[None])
    coef, values = project(basis, y, weights, delta, n_irls)
    thetas = np.empty((len(exponents), 2 * k + 1))
    thetas[:, :k] = np.log(coef[:, 1:])
    thetas[:, k] = np.log(coef[:, 0])
    thetas[:, k + 1:] = exponents
    return thetas, values


def best_screened(exponents, log_x, log_y, counts, delta=HUBER_DELTA, n_irls=4):
    """The best point of the variable-projection screen over ``exponents`` for each row of
    weights in ``counts`` (R, n) (bootstrap resamples): thetas (R, 2K+1), NaN rows where no
    point has a finite objective."""
    out = np.full((len(counts), 2 * log_x.shape[1] + 1), np.nan)
    for i, weights in enumerate(counts):
        thetas, values = varpro_candidates(exponents, log_x, log_y, weights, delta, n_irls)
        j = int(np.argmin(values))
        if np.isfinite(values[j]):
            out[i] = thetas[j]
    return out


def project(basis, y, weights, delta=HUBER_DELTA, n_irls=4):
    """Non-negative coefficients c (G, m) of y_hat = c @ basis[g] for each of G bases (G, m, n).

    Huber-weighted IRLS on relative residuals 1 - y_hat/y (which approximate log residuals),
    exact NNLS each step (:func:`batch_nnls`); zero coefficients are raised to a tiny positive
    value. Returns (coefficients, objectives (G,): the weighted Huber sum of log residuals).
    """
    basis = basis / y
    omega = np.broadcast_to(weights, (len(basis), len(weights))).copy()
    for _ in range(n_irls):
        bw = basis * omega[:, None, :]
        gram = np.matmul(bw, basis.transpose(0, 2, 1))
        coef = batch_nnls(gram, bw.sum(axis=2))  # (G, m)
        resid = 1.0 - np.einsum("gm,gmn->gn", coef, basis)
        omega = weights * np.minimum(1.0, delta / np.maximum(np.abs(resid), _TINY))
    coef = np.maximum(coef, _TINY * y.min())
    ratio = np.einsum("gm,gmn->gn", coef, basis)  # y_hat / y
    with np.errstate(divide="ignore", invalid="ignore"):
        values = huber(-np.log(ratio), delta) @ weights
    return coef, np.where(np.isfinite(values), values, np.inf)


def exponent_grid(k: int, lo=0.02, hi=2.5, n_per_axis=None) -> np.ndarray:
    """A grid of exponent vectors (G, K): 200 points for K = 1, 16 per axis for K = 2 (0.16
    apart: every basin of the reference problem is within reach of a refinement)."""
    n = n_per_axis or (200 if k == 1 else 16 if k == 2 else 12)
    axis = np.linspace(lo, hi, n)
    return np.array(list(itertools.product(*([axis] * k))), dtype=float)


def residuals_and_jacobian(theta, log_x, log_y):
    """Log residuals log L_hat - log L (n,) and their Jacobian w.r.t. theta (n, 2K+1)."""
    k = log_x.shape[1]
    log_total, p = _log_sum_exp_terms(theta, log_x)
    jac = np.empty((len(log_y), 2 * k + 1))
    jac[:, :k + 1] = p
    jac[:, k + 1:] = -p[:, :k] * log_x
    return log_total - log_y, jac


def theta_bounds(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of theta = (c_1..c_K, e, g_1..g_K): coefficients free, exponents in [0, 10]."""
    return (np.r_[np.full(k + 1, -np.inf), np.zeros(k)],
            np.r_[np.full(k + 1, np.inf), np.full(k, 10.0)])


def refine(theta0, log_x, log_y, weights, delta=HUBER_DELTA, max_iter=1000):
    """Local minimum of the weighted Huber objective from theta0; exponents kept in [0, 10].

    Integer weights (no weights, or bootstrap counts) are rows repeated, and the problem is
    solved by scipy's trust-region least squares with loss='huber', f_scale=delta (exactly
    this objective) and the analytic Jacobian: about ten evaluations. Other weights use
    L-BFGS-B with the analytic gradient (objective scaled by 1/delta so ftol bites).
    """
    w = np.asarray(weights, dtype=float)
    lo, hi = theta_bounds(log_x.shape[1])
    theta0 = np.clip(np.asarray(theta0, dtype=float), lo, hi)
    if np.all(w == np.round(w)) and np.all(w >= 0):
        rows = np.repeat(np.arange(len(w)), w.astype(int))
        lx, ly = log_x[rows], log_y[rows]
        res = least_squares(lambda th: residuals_and_jacobian(th, lx, ly)[0], theta0,
                            jac=lambda th: residuals_and_jacobian(th, lx, ly)[1],
                            bounds=(lo, hi), loss="huber", f_scale=delta, method="trf",
                            xtol=1e-12, ftol=1e-13, gtol=1e-13, max_nfev=max_iter)
        return res.x, float(huber(residuals_and_jacobian(res.x, lx, ly)[0], delta).sum())
    scale = 1.0 / delta

    def fun(theta):
        f, g = objective_and_grad(theta, log_x, log_y, weights, delta)
        return f * scale, g * scale

    res = minimize(fun, theta0, jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi, strict=True)),
                   options={"maxiter": max_iter, "maxfun": 2 * max_iter, "ftol": 1e-15,
                            "gtol": 1e-11})
    return res.x, res.fun / scale


def pick_distinct(thetas, values, n_pick, min_sep=0.05):
    """Indices of the n_pick best thetas whose exponents differ by >= min_sep from each other."""
    k = (thetas.shape[1] - 1) // 2
    chosen: list[int] = []
    for i in np.argsort(values):
        if not np.isfinite(values[i]):
            break
        g = thetas[i, k + 1:]
        if all(np.max(np.abs(g - thetas[j, k + 1:])) >= min_sep for j in chosen):
            chosen.append(int(i))
            if len(chosen) == n_pick:
                break
    return chosen


def global_fit(log_x, log_y, weights=None, delta=HUBER_DELTA, *, n_refine=8, patience=2,
               use_epoch_grid=False, exponents=None, extra_starts=None, basin_tol=0.1,
               n_irls=4):
    """Global minimum of the Huber objective: vectorised screening, then L-BFGS-B refinement.

    Screening is variable projection over an exponent grid (exact NNLS for E, A_j at each
    point), plus Epoch's 4,500 starts with ``use_epoch_grid``. Up to ``n_refine`` distinct
    screened candidates are refined, best first, stopping once ``patience`` refinements in a
    row have not lowered the best objective by more than 1e-9 (relative). Returns
    (theta, objective). ``extra_starts`` (thetas) are refined first (the bootstrap passes
    the full-data optimum); screened candidates whose exponents lie within ``basin_tol`` of
    a refined solution are skipped as the same basin (refining them adds nothing).
    """
    k = log_x.shape[1]
    w = np.ones(len(log_y)) if weights is None else np.asarray(weights, dtype=float)
    grid = exponent_grid(k) if exponents is None else exponents
    thetas, values = varpro_candidates(grid, log_x, log_y, w, delta, n_irls=n_irls)
    if use_epoch_grid:
        epoch = epoch_grid(k)
        thetas = np.concatenate([thetas, epoch])
        values = np.concatenate([values, batch_objective(epoch, log_x, log_y, w, delta)])
    given = [] if extra_starts is None else list(np.atleast_2d(extra_starts))
    screened = [thetas[i] for i in pick_distinct(thetas, values, n_refine)]
    best_theta, best_f, stale, refined = None, np.inf, 0, []
    for j, theta0 in enumerate(given + screened):
        if j >= len(given) and any(np.max(np.abs(theta0[k + 1:] - r[k + 1:])) <= basin_tol
                                   for r in refined):
            continue
        theta, f = refine(theta0, log_x, log_y, w, delta)
        refined.append(theta)
        stale = 0 if f < best_f * (1 - 1e-9) else stale + 1
        if f < best_f:
            best_theta, best_f = theta, f
        if stale >= patience:
            break
    if best_theta is None:
        raise BadInput("the fit found no finite objective; check the data for extreme values")
    return best_theta, best_f


def epoch_baseline(log_x, log_y, delta=HUBER_DELTA):
    """The naive Epoch procedure: L-BFGS-B from every one of the grid's starts (slow)."""
    w = np.ones(len(log_y))
    best_theta, best_f = None, np.inf
    for theta0 in epoch_grid(log_x.shape[1]):
        theta, f = refine(theta0, log_x, log_y, w, delta)
        if f < best_f:
            best_theta, best_f = theta, f
    return best_theta, best_f

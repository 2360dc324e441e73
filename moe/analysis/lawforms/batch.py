"""Bootstrap refits of a registry law, every resample at once.

A bootstrap resample is the table's n rows with integer counts, so R resamples are R
parameter vectors refined together on the same rows, each from the full-data optimum (a
resample moves the optimum a little). The refinement is a bounded Levenberg-Marquardt on
the Huber(delta) objective of log residuals, the objective of :func:`base.refine`: each
step solves (J'WJ + mu diag(J'WJ)) step = -J' psi(r) with the IRLS weights
W = count min(1, delta/|r|) (a majoriser of Huber) and psi(r) = count clip(r, -delta, delta),
for all live resamples in one numpy pass. One pass costs about what one of scipy's
least_squares evaluations costs in Python overhead, and replaces R of them.

Shapes: R resamples, n rows, P parameters; ``z`` is the refinement vector of
:func:`base.refine` (log scale for a law's ``log_params``), laws' ``predict`` and
``jacobian`` broadcast parameters of shape (R, 1) against rows of shape (n,).
"""

from __future__ import annotations

import numpy as np

from moe.analysis._lse import HUBER_DELTA, huber

FAILED_RESIDUAL = 1e3  # a row whose prediction is not finite (as in base.refine)
BATCH_ELEMENTS = 4_000_000  # of a resample group's Jacobians (R, n, P): 32 MB of float64
# the Gauss-Newton weight of a row outside delta, from delta/|r|: IRLS (a majoriser of Huber)
# or Huber's own curvature (0, kept tiny so the system stays regular: scipy's choice)
CURVATURES = {"irls": lambda ratio: ratio, "huber": lambda ratio: 1e-6 * np.ones_like(ratio)}


def group_size(n_rows: int, n_params: int) -> int:
    """Resamples refined together: their Jacobians (R, n, P) hold at most BATCH_ELEMENTS
    floats (at least 16 resamples). Groups are independent, so the grouping does not change
    results."""
    return max(16, BATCH_ELEMENTS // (n_rows * n_params))


def stack_columns(*columns) -> np.ndarray:
    """Columns (scalars, (n,) or (R, n)) broadcast and stacked on a last axis: (..., n, P)."""
    return np.stack(np.broadcast_arrays(*columns), axis=-1)


def law_model(law, x: dict, log_y: np.ndarray):
    """(resid, jac) of a law in its refinement vector: z (R, P) -> residuals log L_hat -
    log L (R, n), and their Jacobian (R, n, P) from the law's analytic ``jacobian`` (rows
    whose prediction is not finite: residual FAILED_RESIDUAL, Jacobian 0)."""
    logs = np.array([k in law.log_params for k in law.params])

    def params(z):
        value = np.where(logs, np.exp(np.where(logs, z, 0.0)), z)
        return {k: value[:, j, None] for j, k in enumerate(law.params)}, value

    def resid(z):
        with np.errstate(all="ignore"):
            r = np.log(law.predict(x, params(z)[0])) - log_y
        return np.where(np.isfinite(r), r, FAILED_RESIDUAL)

    def jac(z, r=None):  # r: resid(z) when known, which gives 1 / L_hat without predict
        p, value = params(z)
        with np.errstate(all="ignore"):
            inverse = (1.0 / law.predict(x, p) if r is None else
                       np.where(r == FAILED_RESIDUAL, np.nan, np.exp(-(r + log_y))))
            grad = law.jacobian(x, p) * inverse[..., None]
            grad *= np.where(logs, value, 1.0)[:, None, :]  # d/d log p = p d/dp
        finite = np.isfinite(grad.sum(axis=-1))  # NaN and inf propagate through the sum
        return grad if finite.all() else np.where(finite[..., None], grad, 0.0)

    return resid, jac


def objective(r: np.ndarray, counts: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Sum over rows of count x Huber(delta) of the residual, per resample: (R,)."""
    value = np.sum(counts * huber(r, delta), axis=-1)
    return np.where(np.isfinite(value), value, np.inf)


def _solve(a, rhs, free):
    """x of a x = rhs on the free variables of each problem, 0 on the others: (R, P)."""
    eye = np.eye(a.shape[1])
    a = np.where(free[:, :, None] & free[:, None, :], a, eye)
    rhs = np.where(free, rhs, 0.0)
    with np.errstate(all="ignore"):
        try:
            x = np.linalg.solve(a, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            x = np.stack([np.linalg.lstsq(m, v, rcond=None)[0]
                          for m, v in zip(a, rhs, strict=True)])
    return np.where(np.isfinite(x), x, 0.0)


def _step(jac_z, r, counts, z, mu, lo, hi, delta, outlier_weight):
    """One damped Gauss-Newton step per resample and its predicted decrease of the model.
    Variables at a bound that the gradient pushes outward are held; variables the step
    would carry across a bound are set on it and the others solved again."""
    g = np.matmul((counts * np.clip(r, -delta, delta))[:, None, :], jac_z)[:, 0]
    absr = np.abs(r)
    w = counts * np.where(absr <= delta, 1.0, outlier_weight(delta / np.maximum(absr, 1e-300)))
    h = np.matmul(jac_z.transpose(0, 2, 1) * w[:, None, :], jac_z)
    diag = np.diagonal(h, axis1=1, axis2=2)
    scale = np.maximum(diag, 1e-12 * np.max(diag, axis=1, keepdims=True) + 1e-300)
    a = h + mu[:, None, None] * scale[:, :, None] * np.eye(z.shape[1])
    free = ~(((z <= lo) & (g > 0)) | ((z >= hi) & (g < 0)))
    step = _solve(a, -g, free)
    cross = free & ((z + step < lo) | (z + step > hi))
    if cross.any():
        on_bound = np.where(cross, np.clip(z + step, lo, hi) - z, 0.0)
        step = on_bound + _solve(a, -g - np.matmul(a, on_bound[..., None])[..., 0],
                                 free & ~cross)
    with np.errstate(all="ignore"):
        predicted = -np.sum(step * (g + 0.5 * np.matmul(h, step[..., None])[..., 0]), axis=1)
    return step, predicted


def refine(resid, jac, z0, counts, lo, hi, *, delta: float = HUBER_DELTA,
           max_iter: int = 1000, tol: float = 1e-12,
           curvature: str = "irls") -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt for R problems at once from z0 ((P,) or (R, P)), with Nielsen's
    damping update; a problem stops when an accepted step lowers its objective by <= tol
    (relative) or moves z by <= tol (relative), or when its damping passes 1e15 (no step
    lowers it). Returns (z (R, P), objectives (R,)); a problem whose start has no finite
    objective keeps inf."""
    outlier_weight = CURVATURES[curvature]
    n_prob = counts.shape[0]
    z = np.clip(np.array(np.broadcast_to(z0, (n_prob, len(lo))), dtype=float), lo, hi)
    r = resid(z)
    f = objective(r, counts, delta)
    mu, nu = np.full(n_prob, 1e-3), np.full(n_prob, 2.0)
    live = np.isfinite(f)
    jac_z = np.empty(r.shape + (len(lo),))
    stale = np.ones(n_prob, dtype=bool)  # z moved since its Jacobian was computed
    for _ in range(max_iter):
        idx = np.flatnonzero(live)
        if idx.size == 0:
            break
        zi, fi = z[idx], f[idx]
        todo = idx[stale[idx]]
        if todo.size:  # a rejected step leaves z, and so its Jacobian, as it was
            jac_z[todo], stale[todo] = jac(z[todo], r[todo]), False
        step, predicted = _step(jac_z[idx], r[idx], counts[idx], zi, mu[idx], lo, hi, delta,
                                outlier_weight)
        z_new = np.clip(zi + step, lo, hi)
        r_new = resid(z_new)
        f_new = objective(r_new, counts[idx], delta)
        ok = f_new <= fi
        moved = np.linalg.norm(z_new - zi, axis=1)
        done = ok & ((fi - f_new <= tol * fi) | (moved <= tol * (tol + np.linalg.norm(zi, axis=1))))
        z[idx[ok]], r[idx[ok]], f[idx[ok]], stale[idx[ok]] = z_new[ok], r_new[ok], f_new[ok], True
        with np.errstate(all="ignore"):
            rho = np.where(predicted > 0, (fi - f_new) / predicted, 0.0)
        shrink = np.maximum(1.0 / 3.0, 1.0 - (2.0 * np.clip(rho, 0.0, 1.0) - 1.0) ** 3)
        mu[idx] = np.where(ok, np.maximum(mu[idx] * shrink, 1e-15), mu[idx] * nu[idx])
        nu[idx] = np.where(ok, 2.0, nu[idx] * 2.0)
        live[idx[done | (mu[idx] > 1e15)]] = False
    return z, f


def best_refine(resid, jac, z0, counts, lo, hi, *,
                delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """:func:`refine` with each curvature from the same starts, the lower objective kept per
    problem: Huber's own curvature lands where scipy's least_squares(loss='huber') does on
    identified tables; IRLS is steadier where most residuals lie beyond delta."""
    z, f = refine(resid, jac, z0, counts, lo, hi, delta=delta, curvature="huber")
    z2, f2 = refine(resid, jac, z0, counts, lo, hi, delta=delta, curvature="irls")
    better = f2 < f
    z[better], f[better] = z2[better], f2[better]
    return z, f

"""What every law of the registry is, and the one fitter, checker and bootstrap they share.

A :class:`LawForm` is data plus pure functions (mlfoundations/scaling style): the formula and
its citation, the variables (table roles) it needs, its parameters with bounds, ``predict``,
and ``screen``, a fast global search that returns candidate parameter sets, usually by
variable projection (the coefficients that enter linearly are solved exactly for each point
of a grid over the others). :func:`fit` refines the best candidates with a trust-region
least-squares on Huber(delta = 1e-3) log residuals, the objective of Besiroglu et al. 2024
(arXiv 2404.10102), so every law is fitted by the same criterion and held-out errors compare.

Roles: ``n`` parameters (total or active: the user's column), ``d`` tokens, ``e`` experts,
``g`` granularity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

import moe.analysis.lawforms.batch as batch
from moe.analysis import _lse, identify
from moe.analysis._threads import single_thread_blas
from moe.analysis.resample import row_counts
from moe.errors import BadInput

DELTA = _lse.HUBER_DELTA
BASIN_TOL = 0.1  # exponents this close belong to one basin (as in _lse.global_fit)


@dataclass(frozen=True, kw_only=True)
class LawForm:
    """One published law form (see docs/laws.md for each)."""

    name: str  # registry key, e.g. "chinchilla-tied"
    formula: str  # one line, as published
    citation: str  # paper, arXiv id and equation/table
    variables: tuple  # table roles it needs, e.g. ("n", "d") or ("n", "e")
    params: tuple  # parameter names, in the order the paper writes them
    bounds: dict  # name -> (lo, hi) for the refinement
    predict: Callable  # (x: {role: array}, p: {name: value}) -> loss array
    screen: Callable  # (x, loss) -> list of candidate parameter dicts, best first
    exponents: tuple = ()  # parameters whose magnitude must lie in identify.EXPONENT_RANGE
    log_params: tuple = ()  # positive coefficients, refined in log space
    floor: str | None = None  # the irreducible-loss parameter, if any
    optimum: Callable | None = None  # (p, budget: Budget) -> dict (see moe.analysis.allocate)
    notes: str = ""  # what a user must know (deviations from the paper, assumptions)
    solve: Callable | None = None  # (x, loss, starts) -> (params, objective): a law's own
    # global solver, used instead of screen + refine when it is exact and faster
    jacobian: Callable | None = None  # (x, p) -> (n, len(params)): d predict / d params, in
    # the order of ``params`` (natural scale, not log); without it refinement uses finite
    # differences and the bootstrap refits one resample at a time
    boot_screen: Callable | None = None  # (x, loss, counts (R, n)) -> (R, len(params)): a
    # screened start per bootstrap resample (natural scale), also refined where its exponents
    # are more than BASIN_TOL from the warm refit's (a resample that changed basin)

    def __post_init__(self):
        missing = [p for p in self.params if p not in self.bounds]
        if missing:
            raise ValueError(f"law {self.name}: no bounds for {', '.join(missing)}")


@dataclass(frozen=True, kw_only=True)
class FormFit:
    """A fitted law with its verdict, intervals and the checks that ran."""

    law: LawForm
    params: dict
    objective: float  # sum of Huber(delta) of log residuals
    n_points: int
    seconds: float
    ranges: dict = field(default_factory=dict)  # role -> (min, max) of the fitted rows
    intervals: dict = field(default_factory=dict)  # name -> (lo, hi) bootstrap percentile
    samples: dict = field(default_factory=dict)  # name -> bootstrap draws
    verdict: identify.Verdict = field(default_factory=lambda: identify.Verdict(identified=True))
    checks: dict = field(default_factory=dict)  # {"ran": [...], "not_run": {name: why}}

    def predict(self, x: dict) -> np.ndarray:
        return self.law.predict(x, self.params)


def _to_vector(law: LawForm, p: dict) -> np.ndarray:
    return np.array([np.log(p[k]) if k in law.log_params else p[k] for k in law.params])


def _from_vector(law: LawForm, z) -> dict:
    return {k: float(np.exp(v)) if k in law.log_params else float(v)
            for k, v in zip(law.params, z, strict=True)}


def _vector_bounds(law: LawForm):
    lo, hi = [], []
    for k in law.params:
        a, b = law.bounds[k]
        if k in law.log_params:
            a, b = np.log(max(a, 1e-300)), np.log(b)
        lo.append(a), hi.append(b)
    return np.array(lo, dtype=float), np.array(hi, dtype=float)


def _inside(z, lo, hi) -> np.ndarray:
    """z clipped to just inside finite bounds (scipy wants a strictly feasible start)."""
    with np.errstate(invalid="ignore"):
        return np.clip(z, np.where(np.isfinite(lo), lo + 1e-12 * np.abs(lo), lo),
                       np.where(np.isfinite(hi), hi - 1e-12 * np.abs(hi), hi))


def objective(law: LawForm, x: dict, loss: np.ndarray, p: dict) -> float:
    with np.errstate(all="ignore"):
        r = np.log(loss) - np.log(law.predict(x, p))
    value = float(np.sum(_lse.huber(r, DELTA)))
    return value if np.isfinite(value) else float("inf")


def refine(law: LawForm, x: dict, loss: np.ndarray, start: dict) -> tuple[dict, float]:
    """Trust-region least squares from ``start`` on Huber(delta) log residuals (scipy's
    loss='huber' with f_scale=delta is exactly that objective)."""
    lo, hi = _vector_bounds(law)
    z0 = _inside(_to_vector(law, start), lo, hi)
    log_y = np.log(loss)

    def resid(z):
        with np.errstate(all="ignore"):
            r = np.log(law.predict(x, _from_vector(law, z))) - log_y
        return np.where(np.isfinite(r), r, 1e3)

    jac = "2-point"
    if law.jacobian is not None:
        jac_batch = batch.law_model(law, x, log_y)[1]

        def jac(z):
            return jac_batch(z[None])[0]

    res = least_squares(resid, z0, jac=jac, bounds=(lo, hi), loss="huber", f_scale=DELTA,
                        method="trf", x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                        max_nfev=2000)
    p = _from_vector(law, res.x)
    return p, objective(law, x, loss, p)


def search(law: LawForm, x: dict, loss: np.ndarray, *, n_refine: int = 4,
           extra: list | None = None) -> tuple[dict, float]:
    """Best of :func:`refine` from ``extra`` starts and the law's top screened candidates
    (or the law's own ``solve``)."""
    if law.solve is not None:
        return law.solve(x, loss, list(extra or []))
    starts = list(extra or []) + (law.screen(x, loss)[:n_refine] if n_refine else [])
    best, best_f = None, np.inf
    for start in starts:
        try:
            p, f = refine(law, x, loss, start)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            continue
        if f < best_f:
            best, best_f = p, f
    if best is None:
        raise BadInput(f"the {law.name} law could not be fitted (no finite objective)")
    return best, best_f


def fit(law: LawForm, x: dict, loss: np.ndarray) -> FormFit:
    """Point fit (no checks yet: :func:`moe.analysis.lawforms.checks.verdict` adds them)."""
    start = time.perf_counter()
    p, f = search(law, x, loss)
    ranges = {k: (float(np.min(v)), float(np.max(v))) for k, v in x.items()}
    return FormFit(law=law, params=p, objective=f, n_points=len(loss),
                   seconds=time.perf_counter() - start, ranges=ranges)


def resample_counts(n: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(R, n) how often each row is drawn in resamples 0 .. R-1
    (:func:`moe.analysis.resample.row_counts`, the Approach-3 bootstrap's rule)."""
    return row_counts(n, range(n_resamples), seed)


def refits(law: LawForm, x: dict, loss: np.ndarray, counts: np.ndarray,
           start: dict) -> tuple[np.ndarray, np.ndarray]:
    """(params (R, P) in the order of ``law.params``, objectives (R,)) of every resample
    refitted from ``start`` at once (:mod:`moe.analysis.lawforms.batch`); with a
    ``boot_screen``, each resample's screened start is refined too where it lies in another
    basin, and the better fit kept. A resample whose fit failed has objective inf. Resamples
    go in groups of :func:`batch.group_size` (the Jacobians of a group are held at once)."""
    size = batch.group_size(counts.shape[1], len(law.params))
    with single_thread_blas():
        parts = [_refits(law, x, loss, counts[s:s + size], start)
                 for s in range(0, len(counts), size)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([f for _, f in parts])


def _refits(law: LawForm, x: dict, loss: np.ndarray, counts: np.ndarray, start: dict):
    lo, hi = _vector_bounds(law)
    resid, jac = batch.law_model(law, x, np.log(loss))
    z, f = batch.best_refine(resid, jac, _inside(_to_vector(law, start), lo, hi), counts, lo,
                             hi)
    if law.boot_screen is not None:
        cand = law.boot_screen(x, loss, counts)
        exps = [law.params.index(k) for k in law.exponents]
        rows = np.flatnonzero(np.max(np.abs(cand[:, exps] - z[:, exps]), axis=1) > BASIN_TOL)
        if rows.size:
            zc = _inside(np.array([_to_vector(law, dict(zip(law.params, row, strict=True)))
                                   for row in cand[rows]]), lo, hi)
            z2, f2 = batch.best_refine(resid, jac, zc, counts[rows], lo, hi)
            better = f2 < f[rows]
            z[rows[better]], f[rows[better]] = z2[better], f2[better]
    params = np.array([[_from_vector(law, row)[k] for k in law.params] for row in z])
    return params, f


def bootstrap(result: FormFit, x: dict, loss: np.ndarray, *, n_resamples: int, seed: int = 0,
              level: float = 0.95) -> tuple[dict, dict, int]:
    """(samples, percentile intervals, failures): rows resampled with replacement
    (:func:`resample_counts`), each refitted from the full-data optimum (a resample moves
    the optimum a little, so the global screen is not rerun): all at once
    (:func:`refits`) for a law with an analytic Jacobian, else one by one."""
    law, n = result.law, len(loss)
    counts = resample_counts(n, n_resamples, seed)
    if law.jacobian is not None:
        arr, f = refits(law, x, loss, counts, result.params)
        failed = int(np.sum(~np.isfinite(f)))
        arr = arr[np.isfinite(f)]
    else:
        draws, failed = [], 0
        for row in counts.astype(int):
            idx = np.repeat(np.arange(n), row)
            try:
                p, _ = search(law, {k: v[idx] for k, v in x.items()}, loss[idx], n_refine=0,
                              extra=[result.params])
            except ValueError:
                failed += 1
                continue
            draws.append([p[k] for k in law.params])
        arr = np.array(draws).reshape(-1, len(law.params))
    samples = {k: arr[:, j] for j, k in enumerate(law.params)}
    tail = 100.0 * (1.0 - level) / 2.0
    intervals = {k: tuple(float(q) for q in np.percentile(v, [tail, 100 - tail]))
                 for k, v in samples.items() if len(v) > 1}
    return samples, intervals, failed


def linear_candidates(grid: np.ndarray, basis: Callable, assemble: Callable,
                      x: dict, loss: np.ndarray, n_keep: int = 6) -> list:
    """Variable projection: ``basis(x, grid)`` gives (G, m, n) for the nonlinear parameters on
    each grid row; the m non-negative coefficients are solved exactly (:func:`_lse.project`);
    ``assemble(grid_row, coef)`` names them. Returns the ``n_keep`` best parameter dicts."""
    b = basis(x, grid)
    coef, values = _lse.project(b, loss, np.ones(len(loss)))
    order = np.argsort(values)[:n_keep]
    return [assemble(grid[i], coef[i]) for i in order if np.isfinite(values[i])]

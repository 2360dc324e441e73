"""Seeded nonparametric bootstrap of Approach-3 fits, every resample refined at once.

Each resample draws n rows with replacement (Efron 1979) using its own generator
``numpy.random.default_rng([seed, i])`` (:func:`moe.analysis.resample.row_counts`), so results
do not depend on how resamples are grouped or on the number of workers. A resample is fitted
as a weighted problem (weights = how often each row was drawn) by the procedure of
:func:`moe.analysis._lse.global_fit` with one screened start: refine from the full-data
optimum; screen a coarse exponent grid by variable projection; where the screen's best point
lies in another basin (exponents more than one grid step from the refined ones), refine from
it too and keep the lower objective, so a resample that moves to another basin is still found.
The refinements run for all resamples together (:func:`moe.analysis.lawforms.batch.best_refine`,
a bounded Levenberg-Marquardt on the same Huber objective as scipy's trust-region least
squares in ``_lse.refine``), in one group per worker process: 1000 resamples of the
Chinchilla extraction in 1.9 s on 2 cores (3.5 CPU-s) against 2.1 s (4.1) one by one
(benchmarks/bench_fit.py), and about 9x faster than one by one on the demo's unidentified
table, where scipy crawls along the flat directions; objectives are equal or lower
(tests/test_analysis_fit.py checks them against the one-by-one fits). Standard errors are
the standard deviations over resamples; intervals are percentile intervals.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from moe.analysis import _lse, laws
from moe.analysis._threads import set_single_thread, single_thread_blas
from moe.analysis.fit import FitData, LawFit, theta_to_params
from moe.analysis.lawforms import batch
from moe.analysis.resample import row_counts
from moe.errors import BadInput


@dataclass(frozen=True, kw_only=True)
class BootstrapResult:
    """Bootstrap distribution of a fit's parameters and derived quantities."""

    samples: dict  # name -> (K,) array over successful resamples
    se: dict  # name -> standard deviation over resamples
    intervals: dict  # name -> (lo, hi) percentile interval at ``level``
    level: float  # e.g. 0.95
    n_resamples: int
    n_failed: int  # resamples whose fit raised (excluded)
    seed: int
    seconds: float
    n_workers: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self, *, with_samples: bool = False) -> dict:
        """JSON-ready summary; ``with_samples`` adds the parameter samples (for prediction
        intervals in `moe predict`)."""
        extra = {"samples": {k: [float(x) for x in v] for k, v in self.samples.items()
                             if k in ("E", "A", "B", "alpha", "beta")}} if with_samples else {}
        return {**extra, "level": self.level, "n_resamples": self.n_resamples,
                "n_failed": self.n_failed,
                "seed": self.seed, "seconds": self.seconds, "n_workers": self.n_workers,
                "se": {k: float(v) for k, v in self.se.items()},
                "intervals": {k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()}}


def lse_model(log_x: np.ndarray, log_y: np.ndarray):
    """(resid, jac) of the LSE model for :mod:`moe.analysis.lawforms.batch`: thetas (R, 2K+1)
    -> log residuals log L_hat - log L (R, n) and their Jacobian (R, n, 2K+1), the batched
    form of :func:`moe.analysis._lse.residuals_and_jacobian`."""
    k = log_x.shape[1]

    def resid(z):
        with np.errstate(over="ignore", invalid="ignore"):
            r = _lse.batch_log_sum_exp(z, log_x) - log_y
        return np.where(np.isfinite(r), r, batch.FAILED_RESIDUAL)

    def jac(z, r=None):
        with np.errstate(over="ignore", invalid="ignore"):
            p = _lse.batch_log_sum_exp(z, log_x, with_weights=True)[1]
        out = np.empty(p.shape[:2] + (2 * k + 1,))
        out[..., :k + 1] = p
        out[..., k + 1:] = -p[..., :k] * log_x
        return np.where(np.isfinite(out), out, 0.0)

    return resid, jac


def refit_resamples(log_x, log_y, theta0, counts, delta, screen):
    """Thetas (R, 2K+1) of R resamples (row counts (R, n)), NaN rows where no fit is finite.

    The procedure of ``_lse.global_fit(log_x, log_y, counts[i], delta, n_refine=1,
    exponents=screen, extra_starts=theta0, basin_tol=<one screen step>, n_irls=2)``, with every
    refinement batched (see the module docstring).
    """
    k = log_x.shape[1]
    lo, hi = _lse.theta_bounds(k)
    resid, jac = lse_model(log_x, log_y)
    theta0 = np.clip(np.asarray(theta0, dtype=float), lo, hi)
    z, f = batch.best_refine(resid, jac, theta0, counts, lo, hi, delta=delta)
    axis = np.unique(screen[:, 0])
    step = float(axis[1] - axis[0]) if len(axis) > 1 else 0.05
    cand = _lse.best_screened(screen, log_x, log_y, counts, delta, n_irls=2)
    far = np.max(np.abs(cand[:, k + 1:] - z[:, k + 1:]), axis=1) > step  # NaN: not far
    rows = np.flatnonzero(far)
    if rows.size:
        z2, f2 = batch.best_refine(resid, jac, np.clip(cand[rows], lo, hi), counts[rows], lo,
                                   hi, delta=delta)
        better = f2 < f[rows]
        z[rows[better]], f[rows[better]] = z2[better], f2[better]
    z[~np.isfinite(f)] = np.nan
    return z


def _refit_group(args):
    set_single_thread()
    return refit_resamples(*args)


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="bootstrap", unit="fit", file=sys.stderr)


def _run_all(n_resamples, seed, n_workers, state):
    """(thetas (K, P) with NaN rows for failures, in resample order; worker processes used)."""
    log_x, log_y, theta0, delta, screen = state
    counts = row_counts(len(log_y), range(n_resamples), seed).astype(float)
    size = batch.group_size(log_x.shape[0], 2 * log_x.shape[1] + 1)
    size = max(16, min(size, -(-n_resamples // n_workers)))  # a group for every worker
    groups = [(log_x, log_y, theta0, counts[s:s + size], delta, screen)
              for s in range(0, n_resamples, size)]
    bar = _progress(n_resamples)
    parts = []
    used = min(n_workers, len(groups))
    if used <= 1:
        for group in groups:
            parts.append(refit_resamples(*group))
            if bar:
                bar.update(len(parts[-1]))
    else:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(used, mp_context=ctx) as pool:
            for part in pool.map(_refit_group, groups):
                parts.append(part)
                if bar:
                    bar.update(len(part))
    if bar:
        bar.close()
    return np.concatenate(parts), max(used, 1)


def derived_samples(thetas: np.ndarray, law: str, flops_ref: float,
                    fpt: tuple = (6.0, 1.0)) -> dict:
    """Named parameters (and for chinchilla a, b, tpp_opt at flops_ref) per resample."""
    rows = [theta_to_params(th, law) for th in thetas]
    out = {k: np.array([r[k] for r in rows]) for k in (rows[0] if rows else {})}
    if law == "chinchilla" and rows:
        out["a"], out["b"] = laws.compute_optimal_exponents_general(out["alpha"], out["beta"],
                                                                    fpt[1])
        if np.isfinite(flops_ref):
            n_opt, d_opt = laws.compute_optimal_allocation(
                flops_ref, out["A"], out["B"], out["alpha"], out["beta"], fpt_coef=fpt[0],
                fpt_exp=fpt[1])
            out["tpp_opt"] = d_opt / n_opt
    return out


def bootstrap_fit(fit: LawFit, data: FitData, *, n_resamples: int = 1000, seed: int = 0,
                  level: float = 0.95, n_workers: int | None = None,
                  screen_per_axis: int = 8) -> BootstrapResult:
    """Bootstrap a fit: K resamples of the rows, each fitted from the full-data optimum plus a
    coarse global screen; returns standard errors and percentile intervals for E, A, B,
    alpha, beta, a, b and the compute-optimal tokens per parameter at ``fit.flops_ref``."""
    if n_resamples < 2:
        raise BadInput(f"n_resamples must be >= 2, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise BadInput(f"level must be in (0, 1), got {level}")
    n_workers = n_workers or os.cpu_count() or 1
    log_x = data.log_x()
    screen = _lse.exponent_grid(log_x.shape[1], n_per_axis=screen_per_axis
                                if log_x.shape[1] > 1 else 4 * screen_per_axis)
    state = (log_x, np.log(data.loss), np.asarray(fit.theta), fit.delta, screen)
    start = time.perf_counter()
    with single_thread_blas():
        thetas, n_workers = _run_all(n_resamples, seed, n_workers, state)
    ok = np.all(np.isfinite(thetas), axis=1)
    samples = derived_samples(thetas[ok], fit.law, fit.flops_ref, fit.fpt)
    tail = 100.0 * (1.0 - level) / 2.0
    with np.errstate(invalid="ignore", over="ignore"):  # inf samples of unidentified fits
        se = {k: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
              for k, v in samples.items()}
        intervals = {k: tuple(np.percentile(v, [tail, 100.0 - tail])) if len(v) else
                     (float("nan"), float("nan")) for k, v in samples.items()}
    return BootstrapResult(samples=samples, se=se, intervals=intervals, level=level,
                           n_resamples=n_resamples, n_failed=int((~ok).sum()), seed=seed,
                           seconds=time.perf_counter() - start, n_workers=n_workers)

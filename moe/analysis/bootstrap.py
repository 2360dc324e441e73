"""Seeded, parallel nonparametric bootstrap of Approach-3 fits.

Each resample draws n rows with replacement (Efron 1979) using its own generator
``numpy.random.default_rng([seed, i])``, so results do not depend on the number of workers.
A resample is fitted as a weighted problem (weights = how often each row was drawn), starting
from the full-data optimum plus the best distinct candidate of a coarse variable-projection
screen, so a resample that moves to another basin is still found. Standard errors are the
standard deviations over resamples; intervals are percentile intervals.
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
from moe.analysis.resample import row_counts
from moe.errors import BadInput

_STATE: dict = {}  # per-worker inputs, set by _init_worker (fork copies them cheaply)


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


def _init_worker(log_x, log_y, theta0, delta, screen):
    set_single_thread()
    # one screen-grid step: a screened point this close to the refined full-data start is
    # in its basin (its nearest grid neighbour), so it is not refined again
    axis = np.unique(screen[:, 0])
    step = float(axis[1] - axis[0]) if len(axis) > 1 else 0.05
    _STATE.update(log_x=log_x, log_y=log_y, theta0=theta0, delta=delta, screen=screen,
                  step=step)


def _fit_resample(i: int, seed: int):
    """Fit resample i; returns (i, theta) or (i, None) if the fit failed."""
    log_x, log_y = _STATE["log_x"], _STATE["log_y"]
    weights = row_counts(len(log_y), [i], seed)[0]
    try:
        theta, _ = _lse.global_fit(log_x, log_y, weights, _STATE["delta"], n_refine=1,
                                   use_epoch_grid=False, exponents=_STATE["screen"],
                                   extra_starts=_STATE["theta0"], basin_tol=_STATE["step"],
                                   n_irls=2)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError):
        return i, None
    return i, theta


def _run_chunk(indices, seed):
    return [_fit_resample(i, seed) for i in indices]


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="bootstrap", unit="fit", file=sys.stderr)


def _run_all(n_resamples, seed, n_workers, state):
    """Thetas (K, P) with NaN rows for failures, in resample order."""
    thetas = np.full((n_resamples, len(state[2])), np.nan)
    bar = _progress(n_resamples)
    if n_workers <= 1 or n_resamples < 8:
        _init_worker(*state)
        for i in range(n_resamples):
            _, th = _fit_resample(i, seed)
            if th is not None:
                thetas[i] = th
            if bar:
                bar.update(1)
    else:
        chunk = max(1, min(25, n_resamples // (4 * n_workers)))
        chunks = [range(s, min(s + chunk, n_resamples)) for s in range(0, n_resamples, chunk)]
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=state) as pool:
            for results in pool.map(_run_chunk, chunks, [seed] * len(chunks)):
                for i, th in results:
                    if th is not None:
                        thetas[i] = th
                if bar:
                    bar.update(len(results))
    if bar:
        bar.close()
    return thetas


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
        thetas = _run_all(n_resamples, seed, n_workers, state)
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

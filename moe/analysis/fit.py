"""Approach-3 fits of Chinchilla-style laws, compute-optimal allocation, leave-out validation.

Approach 3 of Hoffmann et al. 2022 (arXiv 2203.15556) as replicated by Besiroglu et al. 2024
(arXiv 2404.10102): minimise sum_i Huber_1e-3(log L_i - log L_hat_i) over
log L_hat = LSE(a - alpha log N, b - beta log D, e), A = e^a, B = e^b, E = e^e.
The global search and the analytic gradient live in :mod:`analysis._lse`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moe.analysis import _lse, laws
from moe.analysis._threads import single_thread_blas
from moe.analysis.tables import TableError, positive_columns

LAWS = ("chinchilla", "fixed_data")
PARAM_NAMES = {"chinchilla": ("E", "A", "B", "alpha", "beta"), "fixed_data": ("E", "A", "alpha")}


@dataclass(frozen=True, kw_only=True)
class FitData:
    """Validated inputs of a fit (all > 0, finite)."""

    n: np.ndarray  # parameters (total or active: the caller's column)
    d: np.ndarray | None  # tokens; None for the fixed-data law
    loss: np.ndarray  # nats per token (or whatever the loss column holds)
    columns: dict = field(default_factory=dict)  # {"n": ..., "d": ..., "loss": ...}
    n_dropped: int = 0  # rows dropped by drop_highest

    def log_x(self) -> np.ndarray:
        cols = [self.n] if self.d is None else [self.n, self.d]
        return np.log(np.column_stack(cols))


@dataclass(frozen=True, kw_only=True)
class LawFit:
    """Result of an Approach-3 fit."""

    law: str  # "chinchilla" or "fixed_data"
    params: dict  # E, A, B, alpha, beta (chinchilla) or E, A, alpha (fixed_data)
    theta: tuple  # the LSE-space optimum (log A.., log E, exponents..)
    objective: float  # sum of Huber(delta) of log residuals at the optimum
    n_points: int
    delta: float
    seconds: float  # wall time of the fit, global search included
    columns: dict = field(default_factory=dict)
    flops_ref: float = float("nan")  # compute (6 N D) at which tpp_opt is quoted

    @property
    def a(self) -> float:
        """N_opt ~ C^a with a = beta/(alpha+beta) (NaN for the fixed-data law)."""
        if self.law != "chinchilla":
            return float("nan")
        return laws.compute_optimal_exponents(self.params["alpha"], self.params["beta"])[0]

    @property
    def b(self) -> float:
        """D_opt ~ C^b with b = alpha/(alpha+beta) (NaN for the fixed-data law)."""
        return 1.0 - self.a

    def allocation(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """Compute-optimal (N_opt, D_opt) at compute C = 6 N D (chinchilla law only)."""
        if self.law != "chinchilla":
            raise ValueError("compute-optimal allocation needs the chinchilla law L(N, D)")
        p = self.params
        return laws.compute_optimal_allocation(flops, p["A"], p["B"], p["alpha"], p["beta"])

    @property
    def tpp_opt(self) -> float:
        """Compute-optimal tokens per parameter D_opt/N_opt at ``flops_ref``."""
        if self.law != "chinchilla" or not np.isfinite(self.flops_ref):
            return float("nan")
        n_opt, d_opt = self.allocation(self.flops_ref)
        return float(d_opt / n_opt)

    def predict(self, n, d=None) -> np.ndarray:
        """The fitted law at (n, d)."""
        p = self.params
        if self.law == "chinchilla":
            if d is None:
                raise ValueError("the chinchilla law needs d (tokens)")
            return laws.chinchilla(n, d, p["E"], p["A"], p["B"], p["alpha"], p["beta"])
        return laws.fixed_data(n, p["E"], p["A"], p["alpha"])

    def to_dict(self) -> dict:
        """JSON-ready record (fit.json): params, objective, n_points, a, b, seconds, ..."""
        return {"law": self.law, "params": dict(self.params), "objective": self.objective,
                "n_points": self.n_points, "a": _nan_to_none(self.a),
                "b": _nan_to_none(self.b), "tpp_opt": _nan_to_none(self.tpp_opt),
                "flops_ref": _nan_to_none(self.flops_ref), "huber_delta": self.delta,
                "columns": dict(self.columns), "seconds": self.seconds}


def _nan_to_none(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def prepare(df: pd.DataFrame, *, law: str = "chinchilla", n_col: str = "n_params_total",
            d_col: str | None = "tokens", loss_col: str = "pretrain_loss",
            c_col: str | None = None, drop_highest: int = 0) -> FitData:
    """Validate and extract fit inputs from a table.

    ``c_col`` (compute, FLOPs) replaces ``d_col`` with D = C / (6 N), as in the Chinchilla
    Figure 4 extraction. ``drop_highest`` drops that many highest-loss rows first (Epoch's
    reference fit drops 5).
    """
    if law not in LAWS:
        raise TableError(f"unknown law {law!r}; choose one of {', '.join(LAWS)}")
    if drop_highest < 0:
        raise TableError(f"drop_highest must be >= 0, got {drop_highest}")
    second = None if law == "fixed_data" else (c_col or d_col)
    if law == "chinchilla" and second is None:
        raise TableError("the chinchilla law needs a tokens column (--d-col) or compute (--c-col)")
    cols = [n_col, loss_col] + ([second] if second else [])
    values = positive_columns(df, cols, purpose=f"the {law} fit")
    if drop_highest:
        if len(values) - drop_highest < 5:
            raise TableError(f"dropping {drop_highest} rows leaves fewer than 5 points")
        values = values[np.argsort(values[:, 1], kind="stable")[:len(values) - drop_highest]]
    n, loss = values[:, 0], values[:, 1]
    d = None
    if second is not None:
        d = values[:, 2] / (6.0 * n) if c_col else values[:, 2]
    columns = {"n": n_col, "loss": loss_col}
    if second is not None:
        columns["d" if not c_col else "c"] = second
    return FitData(n=n, d=d, loss=loss, columns=columns, n_dropped=drop_highest)


def theta_to_params(theta, law: str) -> dict:
    """LSE-space theta -> named parameters."""
    theta = np.asarray(theta, dtype=float)
    if law == "chinchilla":
        return {"E": float(np.exp(theta[2])), "A": float(np.exp(theta[0])),
                "B": float(np.exp(theta[1])), "alpha": float(theta[3]), "beta": float(theta[4])}
    return {"E": float(np.exp(theta[1])), "A": float(np.exp(theta[0])), "alpha": float(theta[2])}


def fit_data(data: FitData, *, delta: float = _lse.HUBER_DELTA, n_refine: int = 12) -> LawFit:
    """Approach-3 fit with the global search of :func:`analysis._lse.global_fit`."""
    law = "fixed_data" if data.d is None else "chinchilla"
    start = time.perf_counter()
    with single_thread_blas():
        theta, obj = _lse.global_fit(data.log_x(), np.log(data.loss), delta=delta,
                                     n_refine=n_refine)
    seconds = time.perf_counter() - start
    flops_ref = float(np.max(6.0 * data.n * data.d)) if data.d is not None else float("nan")
    return LawFit(law=law, params=theta_to_params(theta, law), theta=tuple(map(float, theta)),
                  objective=float(obj), n_points=len(data.loss), delta=delta, seconds=seconds,
                  columns=dict(data.columns), flops_ref=flops_ref)


def fit_table(df: pd.DataFrame, **kwargs) -> LawFit:
    """:func:`prepare` then :func:`fit_data` (keyword arguments of :func:`prepare`)."""
    return fit_data(prepare(df, **kwargs))


@dataclass(frozen=True, kw_only=True)
class LeaveOutResult:
    """Fit on the smaller models, prediction error on the largest."""

    n_holdout: float  # the held-out model size
    n_train: int  # points used to fit
    n_test: int  # points of the largest model
    mean_abs_rel_error: float  # mean |L_pred - L| / L on the held-out points
    max_abs_rel_error: float
    fit: LawFit  # the fit on the smaller models


def leave_out_largest(data: FitData, *, delta: float = _lse.HUBER_DELTA) -> LeaveOutResult:
    """Fit on every point with N below the largest N, predict the points at the largest N."""
    largest = float(np.max(data.n))
    test = np.isclose(data.n, largest, rtol=1e-6)
    train = ~test
    if train.sum() < 5:
        raise TableError(f"leave-out validation needs >= 5 points below the largest model, "
                         f"got {int(train.sum())}")
    sub = FitData(n=data.n[train], d=None if data.d is None else data.d[train],
                  loss=data.loss[train], columns=data.columns)
    fit = fit_data(sub, delta=delta)
    pred = fit.predict(data.n[test], None if data.d is None else data.d[test])
    rel = np.abs(pred - data.loss[test]) / data.loss[test]
    return LeaveOutResult(n_holdout=largest, n_train=int(train.sum()), n_test=int(test.sum()),
                          mean_abs_rel_error=float(rel.mean()),
                          max_abs_rel_error=float(rel.max()), fit=fit)


def is_fixed_tpp(data: FitData, tol: float = 0.05) -> bool:
    """True when D/N is (nearly) constant, so N and D cannot be told apart in L(N, D)."""
    if data.d is None:
        return False
    return bool(np.std(np.log(data.d / data.n)) < tol)

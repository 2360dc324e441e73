"""Approach-3 fits of Chinchilla-style laws, compute-optimal allocation, leave-out validation.

Approach 3 of Hoffmann et al. 2022 (arXiv 2203.15556) as replicated by Besiroglu et al. 2024
(arXiv 2404.10102): minimise sum_i Huber_1e-3(log L_i - log L_hat_i) over
log L_hat = LSE(a - alpha log N, b - beta log D, e), A = e^a, B = e^b, E = e^e.
The global search and the analytic gradient live in :mod:`analysis._lse`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from moe.analysis import _lse, identify, laws
from moe.analysis._threads import single_thread_blas
from moe.analysis.identify import Verdict
from moe.analysis.tables import TableError, numeric_column, used_columns
from moe.errors import BadInput

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
    n_nan_dropped: int = 0  # rows dropped for NaN in a used column
    flops: np.ndarray | None = None  # training compute per row (the table's flops column)
    fpt: tuple = (6.0, 1.0)  # FLOPs per token = fpt[0] * N^fpt[1]
    compute_note: str = "FLOPs per token = 6 N (assumed: no flops column)"
    fpt_scatter: float = 0.0  # std of log(flops/tokens) around the fitted k N^v

    def __post_init__(self):
        if len(self.fpt) != 2 or not self.fpt[0] > 0:
            raise ValueError(f"fpt must be (coefficient > 0, exponent), got {self.fpt}")

    def log_x(self) -> np.ndarray:
        cols = [self.n] if self.d is None else [self.n, self.d]
        return np.log(np.column_stack(cols))

    def compute(self) -> np.ndarray:
        """Training compute per row: the flops column, else FLOPs per token x D."""
        if self.flops is not None:
            return self.flops
        if self.d is None:
            return np.full(len(self.n), np.nan)
        return self.fpt[0] * self.n ** self.fpt[1] * self.d


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
    flops_ref: float = float("nan")  # compute at which tpp_opt is quoted (largest in the data)
    fpt: tuple = (6.0, 1.0)  # FLOPs per token = fpt[0] * N^fpt[1] (allocation uses it)
    compute_note: str = ""
    verdict: Verdict = field(default_factory=lambda: Verdict(identified=True))
    checks: dict = field(default_factory=dict)  # {"ran": [...], "not_run": {name: why}}

    @property
    def n_kind(self) -> str:
        """Which N was fitted: 'total', 'active' or 'as given in <column>'."""
        col = str(self.columns.get("n", ""))
        for kind in ("active", "total"):
            if kind in col.lower():
                return kind
        return f"as given in column {col!r}"

    @property
    def a(self) -> float:
        """N_opt ~ C^a (NaN for the fixed-data law)."""
        if self.law != "chinchilla":
            return float("nan")
        p = self.params
        return laws.compute_optimal_exponents_general(p["alpha"], p["beta"], self.fpt[1])[0]

    @property
    def b(self) -> float:
        """D_opt ~ C^b (NaN for the fixed-data law)."""
        return 1.0 - self.fpt[1] * self.a

    def allocation(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """Compute-optimal (N_opt, D_opt) at compute C = FLOPs-per-token(N) x D."""
        if self.law != "chinchilla":
            raise BadInput("compute-optimal allocation needs the chinchilla law L(N, D)")
        p = self.params
        return laws.compute_optimal_allocation(flops, p["A"], p["B"], p["alpha"], p["beta"],
                                               fpt_coef=self.fpt[0], fpt_exp=self.fpt[1])

    @property
    def tpp_opt(self) -> float:
        """Compute-optimal tokens per parameter D_opt/N_opt at ``flops_ref``."""
        if self.law != "chinchilla" or not np.isfinite(self.flops_ref):
            return float("nan")
        n_opt, d_opt = self.allocation(self.flops_ref)
        return float(d_opt / n_opt)

    def predict(self, n, d=None) -> np.ndarray:
        """The fitted law at (n, d)."""
        return predict_params(self.law, self.params, n, d)

    def to_dict(self) -> dict:
        """JSON-ready record (fit.json): params, objective, identified, warnings, a, b, ..."""
        return {"approach": 3, "law": self.law, "params": dict(self.params),
                **self.verdict.to_dict(), "objective": self.objective,
                "n_points": self.n_points, "a": _nan_to_none(self.a),
                "b": _nan_to_none(self.b), "tpp_opt": _nan_to_none(self.tpp_opt),
                "flops_ref": _nan_to_none(self.flops_ref), "huber_delta": self.delta,
                "columns": dict(self.columns), "n_kind": self.n_kind,
                "compute": {"flops_per_token": "k * N^v", "k": self.fpt[0], "v": self.fpt[1],
                            "source": self.compute_note},
                "checks": self.checks, "seconds": self.seconds}


def predict_params(law: str, p: dict, n, d=None) -> np.ndarray:
    """A law with named parameters at (n, d); arrays of parameters broadcast."""
    if law == "chinchilla":
        if d is None:
            raise BadInput("the chinchilla law needs d (tokens)")
        return laws.chinchilla(n, d, p["E"], p["A"], p["B"], p["alpha"], p["beta"])
    return laws.fixed_data(n, p["E"], p["A"], p["alpha"])


def _nan_to_none(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def flops_per_token_model(n: np.ndarray, d: np.ndarray, flops: np.ndarray):
    """Fit log(flops / tokens) = log k + v log N: ((k, v), scatter of the residuals)."""
    x, y = np.log(n), np.log(flops / d)
    if len(np.unique(np.round(x, 9))) < 2:
        return (float(np.exp(np.mean(y - x))), 1.0), float(np.std(y - x))
    v, log_k = np.polyfit(x, y, 1)
    return (float(np.exp(log_k)), float(v)), float(np.std(y - (log_k + v * x)))


def _compute_model(df, keep, n, d, c_col, flops_col):
    """(flops per row or None, fpt, note, scatter) for :func:`prepare`."""
    if c_col:
        return n * 6.0 * d, (6.0, 1.0), f"D = C / (6 N) from column {c_col!r}", 0.0
    if d is None or flops_col is None or flops_col not in df:
        return None, (6.0, 1.0), "FLOPs per token = 6 N (assumed: no flops column)", 0.0
    flops = numeric_column(df, flops_col, purpose="the compute definition")[keep]
    ok = np.isfinite(flops) & (flops > 0)
    if ok.sum() < 2:
        return (None, (6.0, 1.0), f"FLOPs per token = 6 N (column {flops_col!r} has no values)",
                0.0)
    fpt, scatter = flops_per_token_model(n[ok], d[ok], flops[ok])
    note = (f"FLOPs per token = {fpt[0]:.4g} N^{fpt[1]:.4f}, fitted to {flops_col!r} / tokens "
            f"(scatter {100 * scatter:.1f}%)")
    return np.where(ok, flops, np.nan), fpt, note, scatter


def prepare(df: pd.DataFrame, *, law: str = "chinchilla", n_col: str = "n_params_total",
            d_col: str | None = "tokens", loss_col: str = "val_loss",
            c_col: str | None = None, flops_col: str | None = "flops",
            drop_highest: int = 0, min_points: int = 5) -> FitData:
    """Validate and extract fit inputs from a table.

    ``c_col`` (compute, FLOPs) replaces ``d_col`` with D = C / (6 N), as in the Chinchilla
    Figure 4 extraction. ``flops_col`` (if the table has it) defines the compute: FLOPs per
    token are fitted as k N^v from flops / tokens, and allocation uses them. Rows with NaN
    in a used column are dropped (``n_nan_dropped``). ``drop_highest`` drops that many
    highest-loss rows first (Epoch's reference fit drops 5). ``min_points``: fewest rows
    accepted (held-out rows for a test may be fewer than a fit needs).
    """
    if law not in LAWS:
        raise TableError(f"unknown law {law!r}; choose one of {', '.join(LAWS)}")
    if drop_highest < 0:
        raise TableError(f"drop_highest must be >= 0, got {drop_highest}")
    second = None if law == "fixed_data" else (c_col or d_col)
    if law == "chinchilla" and second is None:
        raise TableError("the chinchilla law needs a tokens column (--d-col) or compute (--c-col)")
    cols = [n_col, loss_col] + ([second] if second else [])
    values, keep = used_columns(df, cols, purpose=f"the {law} fit", min_points=min_points)
    n, loss = values[:, 0], values[:, 1]
    d = None
    if second is not None:
        d = values[:, 2] / (6.0 * n) if c_col else values[:, 2]
    flops, fpt, note, scatter = _compute_model(df, keep, n, d, c_col, flops_col)
    if drop_highest:
        if len(loss) - drop_highest < 5:
            raise TableError(f"dropping {drop_highest} rows leaves fewer than 5 points")
        order = np.argsort(loss, kind="stable")[:len(loss) - drop_highest]
        n, loss = n[order], loss[order]
        d = None if d is None else d[order]
        flops = None if flops is None else flops[order]
    columns = {"n": n_col, "loss": loss_col}
    if second is not None:
        columns["d" if not c_col else "c"] = second
    if flops is not None and not c_col:
        columns["flops"] = flops_col
    return FitData(n=n, d=d, loss=loss, columns=columns, n_dropped=drop_highest,
                   n_nan_dropped=int((~keep).sum()), flops=flops, fpt=fpt, compute_note=note,
                   fpt_scatter=scatter)


def theta_to_params(theta, law: str) -> dict:
    """LSE-space theta -> named parameters."""
    theta = np.asarray(theta, dtype=float)
    if law == "chinchilla":
        return {"E": float(np.exp(theta[2])), "A": float(np.exp(theta[0])),
                "B": float(np.exp(theta[1])), "alpha": float(theta[3]), "beta": float(theta[4])}
    return {"E": float(np.exp(theta[1])), "A": float(np.exp(theta[0])), "alpha": float(theta[2])}


def fit_data(data: FitData, *, delta: float = _lse.HUBER_DELTA, n_refine: int = 8) -> LawFit:
    """Approach-3 fit with the global search of :func:`analysis._lse.global_fit`, and its
    identifiability verdict from the data and the fit (:func:`law_issues`)."""
    law = "fixed_data" if data.d is None else "chinchilla"
    start = time.perf_counter()
    with single_thread_blas():
        theta, obj = _lse.global_fit(data.log_x(), np.log(data.loss), delta=delta,
                                     n_refine=n_refine)
    seconds = time.perf_counter() - start
    compute = data.compute()
    flops_ref = float(np.nanmax(compute)) if np.isfinite(compute).any() else float("nan")
    fit = LawFit(law=law, params=theta_to_params(theta, law), theta=tuple(map(float, theta)),
                 objective=float(obj), n_points=len(data.loss), delta=delta, seconds=seconds,
                 columns=dict(data.columns), flops_ref=flops_ref, fpt=data.fpt,
                 compute_note=data.compute_note)
    return replace(fit, verdict=Verdict.of(law_issues(fit, data)),
                   checks={"ran": list(POINT_CHECKS[:-1] if data.d is None else POINT_CHECKS),
                           "not_run": {"bootstrap intervals": "not checked: no resamples"}})


# the checks of law_issues, by name (fit.json lists them)
POINT_CHECKS = ("spread of each variable", "exponent range", "irreducible loss E",
                "coefficients at bound 0", "Hessian condition", "FLOPs-per-token scatter",
                "N-D collinearity")


def with_checks(fit: LawFit, *, skipped: dict) -> LawFit:
    """The fit with ``skipped`` ({check: why}) recorded as not run."""
    return replace(fit, checks={"ran": list(fit.checks.get("ran", [])),
                                "not_run": {**fit.checks.get("not_run", {}), **skipped}})


def law_issues(fit: LawFit, data: FitData) -> list:
    """Identifiability issues of an Approach-3 fit from its data and its optimum."""
    cols = data.columns
    issues = identify.spread(data.n, f"N ({cols.get('n')})")
    if data.d is not None:
        issues += identify.spread(data.d, f"D ({cols.get('d', cols.get('c'))})")
        issues += _collinear(data)
    p = fit.params
    for name in ("alpha", "beta"):
        if name in p:
            issues += identify.exponent(p[name], name)
    low = float(np.min(data.loss))
    if p["E"] >= low:
        issues.append(identify.Issue(message=f"E = {p['E']:.4g} is above the lowest observed "
                                     f"loss {low:.4g}"))
    elif p["E"] < identify.NEGLIGIBLE * low:
        issues.append(identify.Issue(message=f"E = {p['E']:.3g} is at its bound 0"))
    terms = [("A", "alpha", data.n)] + ([("B", "beta", data.d)] if data.d is not None else [])
    for coef, expo, x in terms:
        if np.max(p[coef] * x ** -p[expo]) < identify.NEGLIGIBLE * low:
            issues.append(identify.Issue(message=f"{coef} = {p[coef]:.3g} is at its bound 0 "
                                         "(its term is negligible on the data)"))
    issues += identify.condition(hessian_condition(fit, data))
    if data.fpt_scatter > 0.05:
        issues.append(identify.Issue(
            message=f"FLOPs per token is not a function of N alone here (scatter "
                    f"{100 * data.fpt_scatter:.0f}%): the compute-optimal allocation is "
                    "approximate", blocking=False))
    return issues


def _collinear(data: FitData, tol: float = 0.05) -> list:
    """log D a linear function of log N across all runs (D = c N^v): the N and D terms are
    confounded. v = 1 is a fixed tokens-per-parameter sweep, v = -1 a single IsoFLOP budget."""
    x, y = np.log(data.n), np.log(data.d)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return []  # a constant column is reported by identify.spread
    v, u = np.polyfit(x, y, 1)
    if np.std(y - (u + v * x)) >= tol:
        return []
    if abs(v - 1) < tol:
        what = "D/N is the same for every run (fixed tokens per parameter)"
    elif abs(v + 1) < tol:
        what = "N x D is the same for every run (a single compute budget)"
    else:
        what = f"D grows as N^{v:.2f} in every run"
    return [identify.Issue(message=f"{what}: A/N^alpha and B/D^beta cannot be told apart")]


def hessian_condition(fit: LawFit, data: FitData) -> float:
    """Condition number of the scaled Hessian of the objective at the optimum, with log N
    and log D centred so the coefficients do not trade off against the exponents merely
    because log N is far from 0."""
    log_x = data.log_x()
    k = log_x.shape[1]
    m = log_x.mean(axis=0)
    theta = np.array(fit.theta, dtype=float)
    theta[:k] -= theta[k + 1:] * m
    centred, log_y, w = log_x - m, np.log(data.loss), np.ones(len(data.loss))
    return identify.hessian_condition(
        lambda th: _lse.objective_and_grad(th, centred, log_y, w, fit.delta)[1], theta)


def bootstrap_issues(fit: LawFit, boot) -> list:
    """Bootstrap intervals wider than the estimate (A, B: than a factor of 10); failures."""
    issues = []
    values = {**fit.params, "a": fit.a, "b": fit.b}
    for name, est in values.items():
        if name in boot.intervals and np.isfinite(est):
            issues += identify.interval(name, est, boot.intervals[name],
                                        log_scale=name in ("A", "B"))
    if boot.n_failed > 0.1 * boot.n_resamples:
        issues.append(identify.Issue(message=f"{boot.n_failed} of {boot.n_resamples} bootstrap "
                                     "resamples failed to fit"))
    return issues


def with_bootstrap(fit: LawFit, data: FitData, boot) -> LawFit:
    """The fit with its verdict including the bootstrap checks."""
    not_run = {k: v for k, v in fit.checks.get("not_run", {}).items()
               if k != "bootstrap intervals"}
    ran = list(fit.checks.get("ran", [])) + [f"bootstrap intervals ({boot.n_resamples} "
                                             "resamples)"]
    return replace(fit, verdict=Verdict.of(law_issues(fit, data) + bootstrap_issues(fit, boot)),
                   checks={"ran": ran, "not_run": not_run})


def fit_table(df: pd.DataFrame, **kwargs) -> LawFit:
    """:func:`prepare` then :func:`fit_data` (keyword arguments of :func:`prepare`)."""
    return fit_data(prepare(df, **kwargs))


def held_out(fit: LawFit, data: FitData) -> dict:
    """Predicted vs observed loss on held-out rows and the mean absolute relative error."""
    pred = fit.predict(data.n, data.d)
    rel = np.abs(pred - data.loss) / data.loss
    rows = [{"n": float(n), **({"d": float(d)} if data.d is not None else {}),
             "observed": float(o), "predicted": float(q)}
            for n, d, o, q in zip(data.n, data.n if data.d is None else data.d, data.loss,
                                  pred, strict=True)]
    return {"n_points": len(rows), "mean_abs_rel_error": float(rel.mean()),
            "max_abs_rel_error": float(rel.max()), "rows": rows}


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
    sub = replace(data, n=data.n[train], d=None if data.d is None else data.d[train],
                  loss=data.loss[train], flops=None if data.flops is None else data.flops[train])
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

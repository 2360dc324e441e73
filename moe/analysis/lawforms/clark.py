"""clark-routed: log10 L(N, E) = a log10 N + b log10 E_hat + c log10 N log10 E_hat + d.

Clark et al. 2022, "Unified Scaling Laws for Routed Language Models", arXiv 2202.01169,
eq. 10 with the saturating expert count of eq. 9, 1/E_hat = 1/(E - 1 + (1/E_start -
1/E_max)^-1) + 1/E_max; base-10 logarithms, the convention of the paper's fitted
coefficients (S-BASE: a = -0.082, b = -0.108, c = 0.009, d = 1.104, E_start = 1.847,
E_max = 314.478). N is the dense model the experts are added to (active parameters); the
law has no tokens (every model saw the same data). Solver: for fixed (E_start, E_max) the
law is linear in (a, b, c, d) in log space: a least-squares solve on each point of a
(E_start, E_max) grid, then trust-region refinement of all six. Optimum: the best E (at
the user's active N) under the memory limit; loss falls with E wherever b + c log10 N < 0,
so the memory limit, not compute, sets E.
"""

from __future__ import annotations

import itertools

import numpy as np

import moe.analysis.lawforms.allocate as allocate
from moe.analysis import laws
from moe.analysis.lawforms.base import LawForm, objective
from moe.analysis.lawforms.batch import stack_columns
from moe.errors import BadInput

PUBLISHED = {"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104, "e_start": 1.847,
             "e_max": 314.478}
GRID = [(s, m) for s, m in itertools.product(np.geomspace(1.05, 10.0, 8),
                                             np.geomspace(16.0, 3000.0, 8))]
LN10 = np.log(10.0)


def predict(x: dict, p: dict):
    """The law; NaN where E_max > E_start > 0 fails (parameters may be (R, 1) arrays)."""
    e_start, e_max = np.asarray(p["e_start"], dtype=float), np.asarray(p["e_max"], dtype=float)
    valid = (e_max > e_start) & (e_start > 0)
    loss = laws.clark_unified(x["n"], x["e"], p["a"], p["b"], p["c"], p["d"],
                              np.where(valid, e_start, 1.0), np.where(valid, e_max, 2.0))
    return np.where(valid, loss, np.nan)


def jacobian(x: dict, p: dict):
    """d L / d (a, b, c, d, e_start, e_max), (..., n, 6): through 1/E_hat = h = 1/w + 1/E_max,
    w = E - 1 + K, K = (1/E_start - 1/E_max)^-1, and d log10 E_hat = -d h / (h ln 10)."""
    n, e = np.asarray(x["n"], dtype=float), np.asarray(x["e"], dtype=float)
    e_start, e_max = p["e_start"], p["e_max"]
    k = 1.0 / (1.0 / e_start - 1.0 / e_max)
    w = e - 1.0 + k
    h = 1.0 / w + 1.0 / e_max
    log_n, log_e = np.log10(n), -np.log10(h)
    loss = predict(x, p)
    dloss_dh = -loss * (p["b"] + p["c"] * log_n) / h
    return stack_columns(loss * LN10 * log_n, loss * LN10 * log_e, loss * LN10 * log_n * log_e,
                         loss * LN10, dloss_dh * -(k / (w * e_start)) ** 2,
                         dloss_dh * ((k / (w * e_max)) ** 2 - 1.0 / e_max ** 2))


def screen(x: dict, loss) -> list:
    log_n, log_y = np.log10(x["n"]), np.log10(loss)
    out = []
    for e_start, e_max in GRID:
        log_e = np.log10(laws.clark_saturated_experts(x["e"], e_start, e_max))
        design = np.column_stack([log_n, log_e, log_n * log_e, np.ones(len(log_n))])
        coef = np.linalg.lstsq(design, log_y, rcond=None)[0]
        p = {"a": coef[0], "b": coef[1], "c": coef[2], "d": coef[3], "e_start": e_start,
             "e_max": e_max}
        out.append((objective(LAW, x, loss, p), {k: float(v) for k, v in p.items()}))
    return [p for _, p in sorted(out, key=lambda t: t[0])]


def optimum(p: dict, budget: allocate.Budget) -> dict:
    if budget.n is None:
        raise BadInput("the clark-routed law has no tokens: give the active parameters "
                         "(--n) and a memory limit (--memory) to choose E")
    rows = [{"experts": int(e), "loss": float(predict({"n": budget.n, "e": e}, p)),
             "n_total": budget.total_params(budget.n, e)} for e in budget.experts
            if budget.n <= budget.max_active(e)]
    if not rows:
        raise BadInput("no expert count fits in the memory limit at this N")
    return {**min(rows, key=lambda r: r["loss"]), "n_active": budget.n, "by_experts": rows}


LAW = LawForm(
    name="clark-routed",
    formula="log10 L = a log10 N + b log10 E_hat + c log10 N log10 E_hat + d",
    citation="Clark et al. 2022, arXiv 2202.01169, eqs. 9-10",
    variables=("n", "e"), params=("a", "b", "c", "d", "e_start", "e_max"),
    bounds={"a": (-3.0, 3.0), "b": (-3.0, 3.0), "c": (-1.0, 1.0), "d": (-20.0, 20.0),
            "e_start": (1e-3, 1e3), "e_max": (1.0, 1e6)},
    predict=predict, screen=screen, log_params=("e_start", "e_max"), optimum=optimum,
    jacobian=jacobian)

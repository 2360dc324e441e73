"""chinchilla: L(N, D) = E + A / N^alpha + B / D^beta.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv 2203.15556,
eq. 2 (published Approach-3 fit, eq. 10: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34,
beta = 0.28). Solver: the Approach-3 global search of :mod:`moe.analysis._lse` (variable
projection over (alpha, beta), exact NNLS for (E, A, B)), as replicated by Besiroglu et al.
2024 (arXiv 2404.10102). Optimum: N_opt, D_opt at compute C (their eq. 4 for C = 6 N D).
"""

from __future__ import annotations

import numpy as np

import moe.analysis.lawforms.allocate as allocate
from moe.analysis import _lse, laws
from moe.analysis._threads import single_thread_blas
from moe.analysis.lawforms.base import LawForm
from moe.analysis.lawforms.batch import stack_columns

PUBLISHED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def predict(x: dict, p: dict):
    return laws.chinchilla(x["n"], x["d"], p["E"], p["A"], p["B"], p["alpha"], p["beta"])


def jacobian(x: dict, p: dict):
    """d L / d (E, A, B, alpha, beta), (..., n, 5)."""
    n, d = np.asarray(x["n"], dtype=float), np.asarray(x["d"], dtype=float)
    n_term, d_term = n ** -p["alpha"], d ** -p["beta"]
    return stack_columns(1.0, n_term, d_term, -p["A"] * n_term * np.log(n),
                         -p["B"] * d_term * np.log(d))


def _params(theta) -> dict:
    return {"E": float(np.exp(theta[2])), "A": float(np.exp(theta[0])),
            "B": float(np.exp(theta[1])), "alpha": float(theta[3]), "beta": float(theta[4])}


def solve(x: dict, loss, starts: list) -> tuple[dict, float]:
    """The LSE global search; ``starts`` (parameter dicts) are refined first."""
    log_x = np.log(np.column_stack([x["n"], x["d"]]))
    extra = [[np.log(p["A"]), np.log(p["B"]), np.log(p["E"]), p["alpha"], p["beta"]]
             for p in starts] or None
    # with starts (a bootstrap resample) a coarse screen guards against a basin jump
    screen_grid = _lse.exponent_grid(2, n_per_axis=12) if extra else None
    with single_thread_blas():
        theta, f = _lse.global_fit(log_x, np.log(loss), n_refine=1 if extra else 8,
                                   extra_starts=extra, exponents=screen_grid)
    return _params(theta), float(f)


def boot_screen(x: dict, loss, counts) -> np.ndarray:
    """The best start of the coarse screen that :func:`solve` runs on a bootstrap resample
    (12 x 12 exponents, variable projection), for each resample (counts (R, n)): (R, 5) in
    the order of ``LAW.params``, NaN where no candidate is finite."""
    log_x, log_y = np.log(np.column_stack([x["n"], x["d"]])), np.log(loss)
    with single_thread_blas():
        thetas = _lse.best_screened(_lse.exponent_grid(2, n_per_axis=12), log_x, log_y, counts)
    # theta = (log A, log B, log E, alpha, beta) -> LAW.params = (E, A, B, alpha, beta)
    return np.column_stack([np.exp(thetas[:, [2, 0, 1]]), thetas[:, 3:]])


def screen(x: dict, loss) -> list:
    return [solve(x, loss, [])[0]]


LAW = LawForm(
    name="chinchilla", formula="L = E + A / N^alpha + B / D^beta",
    citation="Hoffmann et al. 2022, arXiv 2203.15556, eq. 2 (fit: eq. 10)",
    variables=("n", "d"), params=("E", "A", "B", "alpha", "beta"),
    # the bounds of its solver (_lse.refine): E, A, B > 0, exponents in [0, 10]
    bounds={"E": (0.0, np.inf), "A": (0.0, np.inf), "B": (0.0, np.inf), "alpha": (0.0, 10.0),
            "beta": (0.0, 10.0)},
    predict=predict, screen=screen, exponents=("alpha", "beta"), log_params=("E", "A", "B"),
    floor="E", solve=solve, jacobian=jacobian,
    boot_screen=boot_screen,
    optimum=lambda p, budget: allocate.dense_optimum(predict, p, budget))

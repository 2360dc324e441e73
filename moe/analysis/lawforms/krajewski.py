"""krajewski-granularity: L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta.

Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts", arXiv 2402.07871,
eq. 5 (their fit: a = 18.1, alpha = 0.115, b = 30.8, beta = 0.147, g = 2.1, gamma = 0.58,
c = 0.47; N counts the model's parameters at expansion rate 64, G is the granularity: each
expert's hidden size is the dense FFN's divided by G). Solver: for fixed (alpha, beta,
gamma) the law is linear in (c, g, a, b): variable projection over a 14 x 14 x 8 grid with
exact NNLS, then trust-region refinement. Optimum: N_opt, D_opt at compute C for the user's
G; the paper's choice of G also charges the router's FLOPs, which grow with G (its compute
model), and without them this law always prefers the largest G, so G is an input here.
"""

from __future__ import annotations

import itertools

import numpy as np

import moe.analysis.lawforms.allocate as allocate
from moe.analysis.lawforms.base import LawForm, linear_candidates
from moe.analysis.lawforms.batch import stack_columns
from moe.errors import BadInput

PUBLISHED = {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58,
             "c": 0.47}
GRID = np.array(list(itertools.product(np.linspace(0.03, 0.8, 14), np.linspace(0.03, 0.8, 14),
                                       np.linspace(0.1, 1.5, 8))))  # (alpha, beta, gamma)


def predict(x: dict, p: dict):
    n, d, g = (np.asarray(x[k], dtype=float) for k in ("n", "d", "g"))
    return p["c"] + (p["g"] * g ** -p["gamma"] + p["a"]) * n ** -p["alpha"] + p["b"] * d ** -p[
        "beta"]


def jacobian(x: dict, p: dict):
    """d L / d (a, alpha, b, beta, g, gamma, c), (..., n, 7)."""
    n, d, g = (np.asarray(x[k], dtype=float) for k in ("n", "d", "g"))
    n_term, d_term, g_term = n ** -p["alpha"], d ** -p["beta"], g ** -p["gamma"]
    return stack_columns(n_term, -(p["g"] * g_term + p["a"]) * n_term * np.log(n), d_term,
                         -p["b"] * d_term * np.log(d), g_term * n_term,
                         -p["g"] * g_term * np.log(g) * n_term, 1.0)


def _basis(x, grid):
    n, d, g = (np.asarray(x[k], dtype=float)[None] for k in ("n", "d", "g"))
    alpha, beta, gamma = (grid[:, j, None] for j in range(3))
    n_term = n ** -alpha
    return np.stack([np.ones((len(grid), n.shape[1])), g ** -gamma * n_term, n_term,
                     d ** -beta], axis=1)


def screen(x: dict, loss) -> list:
    return linear_candidates(GRID, _basis, lambda row, c: {
        "a": c[2], "alpha": row[0], "b": c[3], "beta": row[1], "g": c[1], "gamma": row[2],
        "c": c[0]}, x, loss)


def optimum(p: dict, budget: allocate.Budget) -> dict:
    if budget.granularity is None:
        raise BadInput("the krajewski-granularity law needs the granularity (--granularity)")
    g = budget.granularity
    out = allocate.dense_optimum(lambda x, q: predict({**x, "g": g}, q), p, budget)
    return {**out, "granularity": g}


LAW = LawForm(
    name="krajewski-granularity", formula="L = c + (g / G^gamma + a) / N^alpha + b / D^beta",
    citation="Krajewski et al. 2024, arXiv 2402.07871, eq. 5",
    variables=("n", "d", "g"), params=("a", "alpha", "b", "beta", "g", "gamma", "c"),
    bounds={"a": (1e-8, 1e30), "alpha": (0.0, 10.0), "b": (1e-8, 1e30), "beta": (0.0, 10.0),
            "g": (1e-8, 1e30), "gamma": (0.0, 10.0), "c": (1e-6, 1e3)},
    predict=predict, screen=screen, exponents=("alpha", "beta", "gamma"),
    log_params=("a", "b", "g", "c"), floor="c", optimum=optimum, jacobian=jacobian)

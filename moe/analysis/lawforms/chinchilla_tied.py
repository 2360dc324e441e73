"""chinchilla-tied: L(N, D) = E + A / N^alpha + B / D^alpha (one exponent for N and D).

The Chinchilla form (Hoffmann et al. 2022, arXiv 2203.15556, eq. 2) with beta = alpha, the
constraint under which compute-optimal N and D grow equally (a = b = 1/2); Gadre et al.
2024 (arXiv 2403.08540) fit this family (their eq. 4 is the same law in (C, M)). No paper
publishes coefficients for this exact form: the recovery test draws from Hoffmann et al.'s
eq. 10 with beta set to alpha = 0.34. Solver: variable projection over alpha (200-point
grid, exact NNLS for E, A, B), then trust-region refinement.
"""

from __future__ import annotations

import numpy as np

import moe.analysis.lawforms.allocate as allocate
from moe.analysis.lawforms.base import LawForm, linear_candidates
from moe.analysis.lawforms.batch import stack_columns

PUBLISHED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34}
GRID = np.linspace(0.02, 2.5, 200)[:, None]


def predict(x: dict, p: dict):
    n, d = np.asarray(x["n"], dtype=float), np.asarray(x["d"], dtype=float)
    return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["alpha"]


def jacobian(x: dict, p: dict):
    """d L / d (E, A, B, alpha), (..., n, 4)."""
    n, d = np.asarray(x["n"], dtype=float), np.asarray(x["d"], dtype=float)
    n_term, d_term = n ** -p["alpha"], d ** -p["alpha"]
    return stack_columns(1.0, n_term, d_term,
                         -p["A"] * n_term * np.log(n) - p["B"] * d_term * np.log(d))


def _basis(x, grid):
    g = grid[:, 0, None]
    return np.stack([np.ones((len(grid), len(x["n"]))), x["n"][None] ** -g,
                     x["d"][None] ** -g], axis=1)


def screen(x: dict, loss) -> list:
    return linear_candidates(GRID, _basis, lambda row, c: {
        "E": c[0], "A": c[1], "B": c[2], "alpha": row[0]}, x, loss)


LAW = LawForm(
    name="chinchilla-tied", formula="L = E + A / N^alpha + B / D^alpha",
    citation="Hoffmann et al. 2022, arXiv 2203.15556, eq. 2 with beta = alpha",
    variables=("n", "d"), params=("E", "A", "B", "alpha"),
    bounds={"E": (1e-6, 1e3), "A": (1e-8, 1e30), "B": (1e-8, 1e30), "alpha": (0.0, 10.0)},
    predict=predict, screen=screen, exponents=("alpha",), log_params=("E", "A", "B"),
    floor="E", jacobian=jacobian,
    optimum=lambda p, budget: allocate.dense_optimum(predict, p, budget))

"""gadre-overtrain: L(C, M) = E + (a M^eta + b M^-eta) C^-eta, M = D / N, C = 6 N D.

Gadre et al. 2024, "Language models scale reliably with over-training and on downstream
tasks", arXiv 2403.08540, eq. 4; their released code (mlfoundations/scaling,
scaling/laws.py, ``powlaw_ours``) fits the same family as E + alpha N^b + beta 6^(b/2) D^b.
It is the Chinchilla law with alpha = beta = 2 eta written in compute and tokens per
parameter (a = A 6^eta, b = B 6^eta), so it fits exactly as chinchilla-tied does; what it
adds is the over-training reading: at fixed M, loss falls as a power of C with an exponent
that does not depend on M. Optimum: M* = (b / a)^(1 / (2 eta)) tokens per parameter for
every C (with C = 6 N D). Solver: variable projection over eta, exact NNLS for E, a, b.
"""

from __future__ import annotations

import numpy as np

import moe.analysis.lawforms.allocate as allocate
from moe.analysis.lawforms.base import LawForm, linear_candidates
from moe.analysis.lawforms.batch import stack_columns

GRID = np.linspace(0.01, 1.25, 200)[:, None]


def _mc(x):
    n, d = np.asarray(x["n"], dtype=float), np.asarray(x["d"], dtype=float)
    return d / n, 6.0 * n * d


def predict(x: dict, p: dict):
    m, c = _mc(x)
    eta = p["eta"]
    return p["E"] + (p["a"] * m ** eta + p["b"] * m ** -eta) * c ** -eta


def jacobian(x: dict, p: dict):
    """d L / d (E, a, b, eta), (..., n, 4)."""
    m, c = _mc(x)
    eta = p["eta"]
    up, down = m ** eta * c ** -eta, m ** -eta * c ** -eta
    log_m, log_c = np.log(m), np.log(c)
    return stack_columns(1.0, up, down, p["a"] * up * (log_m - log_c)
                         - p["b"] * down * (log_m + log_c))


def _basis(x, grid):
    m, c = _mc(x)
    g = grid[:, 0, None]
    return np.stack([np.ones((len(grid), len(m))), m[None] ** g * c[None] ** -g,
                     m[None] ** -g * c[None] ** -g], axis=1)


def screen(x: dict, loss) -> list:
    return linear_candidates(GRID, _basis, lambda row, c: {
        "E": c[0], "a": c[1], "b": c[2], "eta": row[0]}, x, loss)


def optimum(p: dict, budget: allocate.Budget) -> dict:
    out = allocate.dense_optimum(predict, p, budget)
    out["tokens_per_param_closed_form"] = float((p["b"] / p["a"]) ** (1.0 / (2.0 * p["eta"])))
    return out


LAW = LawForm(
    name="gadre-overtrain", formula="L = E + (a M^eta + b M^-eta) C^-eta, M = D/N, C = 6ND",
    citation="Gadre et al. 2024, arXiv 2403.08540, eq. 4",
    variables=("n", "d"), params=("E", "a", "b", "eta"),
    bounds={"E": (1e-6, 1e3), "a": (1e-8, 1e30), "b": (1e-8, 1e30), "eta": (0.0, 5.0)},
    predict=predict, screen=screen, exponents=("eta",), log_params=("E", "a", "b"),
    floor="E", optimum=optimum, jacobian=jacobian,
    notes="the same family as chinchilla-tied (alpha = 2 eta), so its held-out errors match")

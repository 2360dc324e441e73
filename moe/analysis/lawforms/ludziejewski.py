"""ludziejewski-joint: L(N_act, D, E) = a E^delta N_act^(alpha + gamma ln E)
+ b E^omega D^(beta + zeta ln E) + c.

Ludziejewski et al. 2025, "Joint MoE Scaling Laws: Mixture of Experts Can Be Memory
Efficient", arXiv 2502.05172, eq. 4 (fit: a = 35.91, alpha = -0.1889, delta = 0.2285,
gamma = -0.0098, b = 35.98, beta = -0.1775, omega = -0.5529, zeta = 0.0259, c = 1.3637;
exponents are signed, N_act active parameters, D tokens, E experts, E = 1 a dense model).
The paper writes E_hat, a transformed expert count; this module uses E_hat = E (the
transform's definition was not found in this project's sources: docs/laws.md), so fitted
delta, gamma, omega, zeta are for E itself. Solver: the dense slice (delta = gamma =
omega = zeta = 0) by variable projection over (alpha, beta) with exact NNLS for (a, b, c),
then trust-region refinement of all nine. Optimum: the best E, N_act and D at compute
C = 6 N_act D under a memory limit on total parameters (see
:mod:`moe.analysis.lawforms.allocate`), the paper's memory-constrained question.
"""

from __future__ import annotations

import itertools

import numpy as np

import moe.analysis.lawforms.allocate as allocate
from moe.analysis.lawforms.base import LawForm, linear_candidates
from moe.analysis.lawforms.batch import stack_columns

PUBLISHED = {"a": 35.91, "alpha": -0.1889, "delta": 0.2285, "gamma": -0.0098, "b": 35.98,
             "beta": -0.1775, "omega": -0.5529, "zeta": 0.0259, "c": 1.3637}
GRID = np.array(list(itertools.product(-np.linspace(0.03, 1.0, 30),
                                       -np.linspace(0.03, 1.0, 30))))  # (alpha, beta)


def predict(x: dict, p: dict):
    n, d, e = (np.asarray(x[k], dtype=float) for k in ("n", "d", "e"))
    log_e = np.log(e)
    return (p["a"] * e ** p["delta"] * n ** (p["alpha"] + p["gamma"] * log_e)
            + p["b"] * e ** p["omega"] * d ** (p["beta"] + p["zeta"] * log_e) + p["c"])


def jacobian(x: dict, p: dict):
    """d L / d (a, alpha, delta, gamma, b, beta, omega, zeta, c), (..., n, 9)."""
    n, d, e = (np.asarray(x[k], dtype=float) for k in ("n", "d", "e"))
    log_n, log_d, log_e = np.log(n), np.log(d), np.log(e)
    t1 = p["a"] * e ** p["delta"] * n ** (p["alpha"] + p["gamma"] * log_e)
    t2 = p["b"] * e ** p["omega"] * d ** (p["beta"] + p["zeta"] * log_e)
    return stack_columns(t1 / p["a"], t1 * log_n, t1 * log_e, t1 * log_e * log_n,
                         t2 / p["b"], t2 * log_d, t2 * log_e, t2 * log_e * log_d,
                         1.0)


def _basis(x, grid):
    n, d = (np.asarray(x[k], dtype=float)[None] for k in ("n", "d"))
    return np.stack([np.ones((len(grid), n.shape[1])), n ** grid[:, 0, None],
                     d ** grid[:, 1, None]], axis=1)


def screen(x: dict, loss) -> list:
    return linear_candidates(GRID, _basis, lambda row, c: {
        "a": c[1], "alpha": row[0], "delta": 0.0, "gamma": 0.0, "b": c[2], "beta": row[1],
        "omega": 0.0, "zeta": 0.0, "c": c[0]}, x, loss)


LAW = LawForm(
    name="ludziejewski-joint",
    formula="L = a E^delta N^(alpha + gamma ln E) + b E^omega D^(beta + zeta ln E) + c",
    citation="Ludziejewski et al. 2025, arXiv 2502.05172, eq. 4",
    variables=("n", "d", "e"),
    params=("a", "alpha", "delta", "gamma", "b", "beta", "omega", "zeta", "c"),
    bounds={"a": (1e-8, 1e30), "alpha": (-5.0, 0.0), "delta": (-5.0, 5.0),
            "gamma": (-1.0, 1.0), "b": (1e-8, 1e30), "beta": (-5.0, 0.0),
            "omega": (-5.0, 5.0), "zeta": (-1.0, 1.0), "c": (1e-6, 1e3)},
    predict=predict, screen=screen, exponents=("alpha", "beta"), log_params=("a", "b", "c"),
    floor="c", optimum=lambda p, budget: allocate.expert_optimum(predict, p, budget),
    jacobian=jacobian,
    notes="E_hat = E: the paper's expert-count transform is not applied")

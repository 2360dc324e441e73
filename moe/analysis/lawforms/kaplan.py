"""kaplan: L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D.

Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv 2001.08361, eq. 1.5
(published: alpha_N = 0.076, alpha_D = 0.095, N_c = 8.8e13, D_c = 5.4e13, N counting
non-embedding parameters, D in tokens). No irreducible term. Solver: with q = alpha_N /
alpha_D and alpha_D fixed, L^(1/alpha_D) = N_c^q N^-q + D_c D^-1 is linear in (N_c^q, D_c):
variable projection over a (alpha_D, q) grid, then trust-region refinement of
(log N_c, log D_c, alpha_N, alpha_D). Optimum: N_opt, D_opt at compute C, searched along
C = k N^v D (the paper's own allocation, eq. 1.7, is from its L(N, S_min) law instead).
"""

from __future__ import annotations

import itertools

import numpy as np

import moe.analysis.lawforms.allocate as allocate
from moe.analysis import _lse
from moe.analysis.lawforms.base import LawForm
from moe.analysis.lawforms.batch import stack_columns

PUBLISHED = {"N_c": 8.8e13, "D_c": 5.4e13, "alpha_N": 0.076, "alpha_D": 0.095}
GRID = np.array(list(itertools.product(np.geomspace(0.02, 1.5, 40),
                                       np.geomspace(0.1, 5.0, 40))))  # (alpha_D, q)


def predict(x: dict, p: dict):
    n, d = np.asarray(x["n"], dtype=float), np.asarray(x["d"], dtype=float)
    q = p["alpha_N"] / p["alpha_D"]
    with np.errstate(over="ignore"):
        return ((p["N_c"] / n) ** q + p["D_c"] / d) ** p["alpha_D"]


def jacobian(x: dict, p: dict):
    """d L / d (N_c, D_c, alpha_N, alpha_D), (..., n, 4): with u = (N_c/N)^q, q = alpha_N/alpha_D,
    s = u + D_c/D and L = s^alpha_D."""
    n, d = np.asarray(x["n"], dtype=float), np.asarray(x["d"], dtype=float)
    q, alpha_d = p["alpha_N"] / p["alpha_D"], p["alpha_D"]
    log_ratio = np.log(p["N_c"] / n)
    with np.errstate(over="ignore"):
        u = np.exp(q * log_ratio)
        s = u + p["D_c"] / d
        loss = s ** alpha_d
    return stack_columns(loss * alpha_d / s * q * u / p["N_c"], loss * alpha_d / (s * d),
                         loss / s * u * log_ratio,
                         loss * (np.log(s) - q / s * u * log_ratio))


def screen(x: dict, loss) -> list:
    n, d = np.asarray(x["n"], dtype=float), np.asarray(x["d"], dtype=float)
    log_n = np.log(n)
    out = []
    for alpha_d in np.unique(GRID[:, 0]):
        qs = GRID[GRID[:, 0] == alpha_d, 1]
        target = loss ** (1.0 / alpha_d)
        basis = np.stack([np.exp(-qs[:, None] * log_n[None]),
                          np.broadcast_to(1.0 / d, (len(qs), len(d)))], axis=1)
        coef, values = _lse.project(basis, target, np.ones(len(loss)))
        j = int(np.argmin(values * alpha_d ** 2))  # log L = alpha_D log(target)
        if np.isfinite(values[j]):
            q = qs[j]
            out.append((values[j] * alpha_d ** 2, {
                "N_c": float(coef[j, 0] ** (1.0 / q)), "D_c": float(coef[j, 1]),
                "alpha_N": float(q * alpha_d), "alpha_D": float(alpha_d)}))
    return [p for _, p in sorted(out, key=lambda t: t[0])]


LAW = LawForm(
    name="kaplan", formula="L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D",
    citation="Kaplan et al. 2020, arXiv 2001.08361, eq. 1.5",
    variables=("n", "d"), params=("N_c", "D_c", "alpha_N", "alpha_D"),
    bounds={"N_c": (1e-3, 1e40), "D_c": (1e-3, 1e40), "alpha_N": (1e-4, 5.0),
            "alpha_D": (1e-4, 5.0)},
    predict=predict, screen=screen, exponents=("alpha_N", "alpha_D"),
    log_params=("N_c", "D_c"), jacobian=jacobian,
    optimum=lambda p, budget: allocate.dense_optimum(predict, p, budget))

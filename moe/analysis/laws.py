"""Scaling laws as pure functions ``f(x, *params)`` (numpy in, numpy out).

Whether N means total or active parameters is the caller's choice of column; the laws do
not care. Losses are in nats per token unless the data say otherwise.
"""

from __future__ import annotations

import numpy as np


def chinchilla(n, d, E, A, B, alpha, beta):
    """Chinchilla parametric loss (Hoffmann et al. 2022, arXiv 2203.15556, eq. 2).

        L(N, D) = E + A / N^alpha + B / D^beta

    N: parameters, D: training tokens; E is the irreducible loss.
    """
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    return E + A * n ** (-alpha) + B * d ** (-beta)


def fixed_data(n, E, A, alpha):
    """Single-variable power law with an offset (Kaplan et al. 2020, arXiv 2001.08361, form
    L(N) = (N_c/N)^alpha_N plus the irreducible term of Hoffmann et al. 2022):

        L(N) = E + A / N^alpha

    Used at fixed data (D constant) or along a fixed tokens-per-parameter line (D = tpp * N),
    where B / D^beta = B tpp^-beta N^-beta folds into the N term when alpha = beta.
    """
    n = np.asarray(n, dtype=float)
    return E + A * n ** (-alpha)


def clark_saturated_experts(e, e_start, e_max):
    """Clark et al. 2022's saturating transform of the expert count (arXiv 2202.01169, eq. 9):

        1 / E_hat = 1 / (E - 1 + (1/E_start - 1/E_max)^-1) + 1 / E_max

    so E_hat(1) = E_start, E_hat -> E_max as E -> inf, and E_hat ~ E for
    E_start << E << E_max. ``e`` is the number of experts (1 for a dense model).
    """
    e = np.asarray(e, dtype=float)
    if not (np.all(np.asarray(e_max) > e_start) and np.all(np.asarray(e_start) > 0)):
        raise ValueError(f"need e_max > e_start > 0, got e_start={e_start}, e_max={e_max}")
    return 1.0 / (1.0 / (e - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def clark_unified(n, e, a, b, c, d, e_start, e_max):
    """Unified scaling law for routed language models (Clark et al. 2022, arXiv 2202.01169,
    eq. 10), sparsity-aware through the expert count E:

        log10 L(N, E) = a log10 N + b log10 E_hat + c log10 N log10 E_hat + d

    in base-10 logarithms, the convention of the paper's fitted coefficients (its S-BASE row:
    a = -0.082, b = -0.108, c = 0.009, d = 1.104, E_start = 1.847, E_max = 314.5, with which
    the benefit of routing, b + c log10 N, vanishes near N = 10^12 as the paper states).
    N is the dense (active) parameter count of the base model, E_hat the saturated expert
    count (:func:`clark_saturated_experts`). a < 0 and b < 0 mean loss falls with N and with
    experts; c > 0 means the benefit of experts shrinks as N grows.
    """
    log_n = np.log10(np.asarray(n, dtype=float))
    log_e = np.log10(clark_saturated_experts(e, e_start, e_max))
    return 10.0 ** (a * log_n + b * log_e + c * log_n * log_e + d)


def compute_optimal_exponents(alpha, beta):
    """Chinchilla allocation exponents a = beta/(alpha+beta), b = alpha/(alpha+beta):
    N_opt ~ C^a, D_opt ~ C^b (Hoffmann et al. 2022, eq. 4)."""
    s = alpha + beta
    return beta / s, alpha / s


def compute_optimal_allocation(flops, A, B, alpha, beta, *, fpt_coef=6.0, fpt_exp=1.0):
    """Compute-optimal N and D at compute C = F(N) D under the Chinchilla law, where
    F(N) = fpt_coef * N^fpt_exp is the training FLOPs per token (6 N for a dense model whose
    N does all the compute; for an MoE fitted on total parameters F comes from the table).

    Minimising L(N, C / F(N)) gives alpha A N^-alpha = v beta B (F(N)/C)^beta, so
        N_opt = (alpha A C^beta / (v beta B k^beta))^(1/(alpha + v beta)),  D_opt = C / F(N_opt)
    with k = fpt_coef, v = fpt_exp; k = 6, v = 1 is Hoffmann et al. 2022, eq. 4:
    N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)).
    Returns (N_opt, D_opt) arrays.
    """
    c = np.asarray(flops, dtype=float)
    k, v = float(fpt_coef), float(fpt_exp)
    # Bootstrap resamples of a poorly identified fit can drive B to 0: that resample's
    # allocation is inf, which the percentile summary reports as such.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_n = (np.log(alpha * A / (v * beta * B)) + beta * np.log(c) - beta * np.log(k)) / (
            alpha + v * beta)
        n_opt = np.exp(log_n)
        return n_opt, c / (k * n_opt ** v)


def compute_optimal_exponents_general(alpha, beta, fpt_exp=1.0):
    """N_opt ~ C^a, D_opt ~ C^b when FLOPs per token ~ N^v: a = beta/(alpha + v beta),
    b = 1 - v a (v = 1 gives :func:`compute_optimal_exponents`)."""
    a = beta / (alpha + fpt_exp * beta)
    return a, 1.0 - fpt_exp * a


def isoflop_loss(n, flops, E, A, B, alpha, beta):
    """Chinchilla loss along an IsoFLOP line, D = C / (6 N)."""
    n = np.asarray(n, dtype=float)
    return chinchilla(n, np.asarray(flops, dtype=float) / (6.0 * n), E, A, B, alpha, beta)

"""Synthetic results tables with known ground truth, for tests, examples and benchmarks.

Nothing here is used on real data: these tables let a user (and the test-suite) check that the
fitters recover parameters they were generated from.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from moe.analysis import laws
from moe.config import sparsity

VOCAB = 512  # pocket vocabulary size used for the embedding count


def _moe_params(d_model: int, n_layers: int, n_experts: int, top_k: int):
    """(total, active, embedding) parameter counts of a SwiGLU MoE with hidden 2 d_model."""
    embedding = 2 * VOCAB * d_model  # untied input and output embeddings
    attn = 4 * d_model * d_model
    expert = 3 * d_model * 2 * d_model
    router = d_model * n_experts if n_experts > 1 else 0
    total = embedding + n_layers * (attn + n_experts * expert + router)
    active = embedding + n_layers * (attn + top_k * expert + router)
    return total, active, embedding


def pocket_table(*, seed: int = 0, tpp: float = 20.0, widths=(64, 96, 128),
                 experts=(1, 4, 8, 16), top_ks=(1, 2, 4), noise: float = 0.005) -> pd.DataFrame:
    """A pocket-sweep-shaped table: one token budget per run at fixed tokens per parameter.

    Pre-training loss follows L = 1.5 + 60/N_active^0.3 + 80/D^0.3 (times lognormal noise);
    a memorization task tracks pre-training loss; a reasoning task is U-shaped in sparsity
    with its minimum at s = 0.6 and improves with top-k at equal pre-training loss.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for d, e, k in itertools.product(widths, experts, top_ks):
        if k > e or (e == 1 and k != 1):
            continue
        total, active, emb = _moe_params(d, 2, e, k)
        tokens = tpp * total
        s = sparsity(k, e)
        pre = (1.5 + 60 * active ** -0.3 + 80 * tokens ** -0.3) * np.exp(rng.normal(0, noise))
        mem = 0.4 + 1.3 * pre + rng.normal(0, noise)
        rea = 0.8 + 0.9 * pre + 1.5 * (s - 0.6) ** 2 - 0.05 * np.log2(k) + rng.normal(0, noise)
        row = {"run_id": f"d{d}-e{e}-k{k}", "d_model": d, "n_layers": 2, "n_experts": e,
               "top_k": k, "sparsity": s, "n_params_total": total, "n_params_active": active,
               "n_params_embedding": emb, "tokens": tokens, "tpp": tpp,
               "flops": 6.0 * active * tokens, "train_loss": pre + 0.01, "val_loss": pre}
        for name, kind, loss in (("recall", "memorization", mem), ("arith", "reasoning", rea)):
            row[f"task/{name}/loss"] = loss
            row[f"task/{name}/bits_per_token"] = loss / np.log(2)
            row[f"task/{name}/bits_per_byte"] = loss / np.log(2) / 3.0
            row[f"task/{name}/accuracy"] = float(np.clip(np.exp(-loss), 0, 1))
            row[f"task/{name}/kind"] = kind
        rows.append(row)
    return pd.DataFrame(rows)


def chinchilla_table(params: dict, *, seed: int = 0, noise: float = 0.01,
                     n_values=(1e7, 2.5e7, 6e7, 1.5e8, 4e8, 1e9),
                     tpp_values=(2.0, 5.0, 10.0, 20.0, 50.0, 100.0)) -> pd.DataFrame:
    """A (N x tokens-per-parameter) grid with loss from the Chinchilla law times
    exp(Normal(0, noise)); columns n_params_total, tokens, flops, tpp, val_loss."""
    rng = np.random.default_rng(seed)
    grid = list(itertools.product(n_values, tpp_values))
    n, tpp = (np.array([g[i] for g in grid], dtype=float) for i in (0, 1))
    d = n * tpp
    p = params
    loss = laws.chinchilla(n, d, p["E"], p["A"], p["B"], p["alpha"], p["beta"])
    loss = loss * np.exp(rng.normal(0.0, noise, len(n)))
    return pd.DataFrame({"n_params_total": n, "tokens": d, "tpp": tpp, "flops": 6 * n * d,
                         "val_loss": loss})


def isoflop_table(params: dict, *, seed: int = 0, noise: float = 0.003,
                  budgets=(1e17, 1e18, 1e19), n_per_budget: int = 7, centre_factors=None,
                  active_fraction: float = 1.0, decades: float = 2.0) -> pd.DataFrame:
    """IsoFLOP profiles: per budget C, N log-spaced over ``decades`` decades around the law's
    optimum times ``centre_factors[i]`` (default 1), D = C / FLOPs-per-token.

    ``active_fraction`` f < 1 makes an MoE table: N (n_params_total) is total parameters,
    n_params_active = f N does the compute (C = 6 f N D) and the loss follows the law in N.
    """
    if not 0 < active_fraction <= 1:
        raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction}")
    rng = np.random.default_rng(seed)
    factors = centre_factors or (1.0,) * len(budgets)
    law = {k: params[k] for k in ("E", "A", "B", "alpha", "beta")}
    rows = []
    for c, factor in zip(budgets, factors, strict=True):
        n_opt, _ = laws.compute_optimal_allocation(c, params["A"], params["B"], params["alpha"],
                                                   params["beta"], fpt_coef=6 * active_fraction)
        for n in factor * n_opt * np.logspace(-decades / 2, decades / 2, n_per_budget):
            d = c / (6 * active_fraction * n)
            loss = laws.chinchilla(n, d, **law)
            rows.append({"n_params_total": n, "n_params_active": active_fraction * n,
                         "tokens": d, "tpp": d / n, "flops": c,
                         "val_loss": loss * np.exp(rng.normal(0, noise))})
    return pd.DataFrame(rows)


def findings_table(*, seed: int = 0, memo_sparsity: float = 0.0, reasoning_u: float = 0.05,
                   reasoning_at: float = 2.0, reasoning_trend: float = 0.02,
                   reasoning_curve: float = 0.0, loss_u: float = 0.0, loss_at: float = 2.0,
                   topk: float = -0.05, noise: float = 0.005, pretrain_noise: float = 0.002,
                   widths=(32, 48, 64), experts=(1, 2, 4, 8, 16, 32), top_ks=(1, 2, 4, 8),
                   tokens: float = 1e6, seeds: int = 1) -> pd.DataFrame:
    """A fixed-token sweep with each of the paper's findings set by a knob, for
    :mod:`moe.analysis.findings`; ``seeds`` runs per design point (noise drawn anew).

    With x = log2(E/k), pre-training loss L = 1.5 + 30/N_act^0.3 + 30/N_tot^0.3 + 80/D^0.3
    + ``loss_u`` (x - ``loss_at``)^2: by default it falls with total parameters (its optimum
    is the sparsest model), and ``loss_u`` > 0 gives it an interior optimum, as at pocket
    scale. memorization = 0.4 + 1.3 L + ``memo_sparsity`` s (0: one curve, as in the paper);
    reasoning = 0.8 + 0.9 L + ``reasoning_curve`` (L - 1.5)^2 + ``reasoning_u``
    (x - ``reasoning_at``)^2 + ``reasoning_trend`` x + ``topk`` log2 k. By default that
    plants every finding: the fan-out (trend and U both rise with x at equal loss), a
    reasoning optimum (x ~ 1.8) denser than the loss optimum, and lower loss for larger k.
    With only ``reasoning_curve`` and ``loss_u`` it is the confound: reasoning a pure
    function of a loss whose own optimum in sparsity is interior. Task losses get
    Normal(0, ``noise``) noise, pre-training loss Normal(0, ``pretrain_noise``).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for d, e, k, rep in itertools.product(widths, experts, top_ks, range(seeds)):
        if (e == 1 and k != 1) or (e > 1 and k >= e):
            continue
        total, active, emb = _moe_params(d, 2, e, k)
        s, x = sparsity(k, e), np.log2(e / k)
        pre = 1.5 + 30 * active ** -0.3 + 30 * total ** -0.3 + 80 * tokens ** -0.3
        pre += loss_u * (x - loss_at) ** 2 + rng.normal(0, pretrain_noise)
        mem = 0.4 + 1.3 * pre + memo_sparsity * s + rng.normal(0, noise)
        rea = (0.8 + 0.9 * pre + reasoning_curve * (pre - 1.5) ** 2
               + reasoning_u * (x - reasoning_at) ** 2 + reasoning_trend * x
               + topk * np.log2(k) + rng.normal(0, noise))
        row = {"run_id": f"d{d}-e{e}-k{k}-s{rep}", "d_model": d, "n_layers": 2,
               "n_experts": e, "top_k": k, "sparsity": s, "n_params_total": total,
               "n_params_active": active, "n_params_embedding": emb, "tokens": tokens,
               "tpp": tokens / total, "flops": 6.0 * active * tokens, "train_loss": pre + 0.01,
               "val_loss": pre}
        for name, kind, loss in (("recall", "memorization", mem), ("arith", "reasoning", rea)):
            row[f"task/{name}/loss"] = loss
            row[f"task/{name}/kind"] = kind
        rows.append(row)
    return pd.DataFrame(rows)


def _grid(**axes) -> dict:
    rows = list(itertools.product(*axes.values()))
    return {k: np.array([r[i] for r in rows], dtype=float) for i, k in enumerate(axes)}


def _with_tokens(x: dict) -> dict:
    x = dict(x)
    x["d"] = x["n"] * x.pop("tpp")
    return x


def law_tables() -> dict:
    """{law name: (its paper's published coefficients, a design table {role: array})} for
    each registry law (the coefficients and their sources are in each law's module; for
    abnar-sparsity, whose fitted values were not reachable, a planted set: see its module)."""
    from moe.analysis.lawforms import (
        abnar,
        chinchilla,
        chinchilla_tied,
        clark,
        kaplan,
        krajewski,
        ludziejewski,
    )

    dense = _with_tokens(_grid(n=np.geomspace(1e7, 1e9, 6), tpp=np.geomspace(2, 200, 6)))
    return {
        "chinchilla": (chinchilla.PUBLISHED, dense),
        "chinchilla-tied": (chinchilla_tied.PUBLISHED, dense),
        "kaplan": (kaplan.PUBLISHED, dense),
        "clark-routed": (clark.PUBLISHED, _grid(n=np.geomspace(1.5e7, 1.3e9, 6),
                                                e=[1, 8, 16, 32, 64, 128, 256, 512])),
        "krajewski-granularity": (krajewski.PUBLISHED, _grid(
            n=np.geomspace(1e8, 4e9, 5), d=np.geomspace(1e9, 1e11, 4), g=[1, 2, 4, 8, 16])),
        "ludziejewski-joint": (ludziejewski.PUBLISHED, _with_tokens(_grid(
            n=np.geomspace(5e7, 2.7e9, 5), tpp=[4, 16, 64], e=[1, 2, 4, 8, 16, 32]))),
        "abnar-sparsity": (abnar.PLANTED, _grid(  # the paper's sparsities, S = 0.98 included
            n=np.geomspace(1e8, 4e9, 5), d=np.geomspace(2e9, 1e11, 4),
            s=[0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98])),
    }

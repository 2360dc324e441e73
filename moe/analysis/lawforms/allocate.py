"""Optimal allocation under a fitted law: "what should I train with C FLOPs (and M bytes)?"

Compute is C = k N^v D (the table's FLOPs per token, 6 N for a dense model: see
docs/architecture.md, "Compute"). For a law in (N, D) the optimum minimises L(N, C / (k N^v))
over N (a bounded one-dimensional search in log N, exact for every law form). For MoE laws
the search also runs over the expert count E (or takes the granularity G as given), and a
memory limit bounds the total parameters:

    N_total = N_active (1 + s (E / k_top - 1))          (bytes = N_total x bytes_per_param)

where s is the share of active parameters in the routed experts' FFNs (default 2/3, a
standard transformer's FFN share) and k_top the experts per token: top-k routing touches k
of E equal experts, so the expert parameters grow by E / k over the active ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from moe.errors import BadInput

LOG_N_RANGE = (np.log(1e3), np.log(1e15))


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What the user has: compute, optionally memory, and the MoE shape assumptions."""

    flops: float  # training compute C
    memory_bytes: float | None = None  # limit on the model's parameter memory
    bytes_per_param: float = 2.0  # bf16 weights
    fpt: tuple = (6.0, 1.0)  # FLOPs per token = fpt[0] * N^fpt[1] (from the fit's table)
    top_k: int = 1  # experts per token (MoE laws)
    expert_share: float = 2.0 / 3.0  # share of active parameters in the routed experts
    experts: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # E searched by the MoE laws
    granularity: float | None = None  # G, for the granularity law
    n: float | None = None  # active parameters, for laws without tokens (Clark et al.)

    def __post_init__(self):
        if not self.flops > 0 and self.n is None:
            raise BadInput(f"the compute budget must be > 0 FLOPs, got {self.flops}")
        if self.memory_bytes is not None and not self.memory_bytes > 0:
            raise BadInput(f"the memory limit must be > 0 bytes, got {self.memory_bytes}")
        if not 0 < self.expert_share <= 1:
            raise BadInput(f"expert_share must be in (0, 1], got {self.expert_share}")

    def total_params(self, n_active: float, e: float) -> float:
        """Total parameters of an MoE with ``n_active`` active parameters and ``e`` experts."""
        return n_active * (1.0 + self.expert_share * (max(e, self.top_k) / self.top_k - 1.0))

    def max_active(self, e: float) -> float:
        """Largest active N the memory limit allows at ``e`` experts (inf without a limit)."""
        if self.memory_bytes is None:
            return np.inf
        return self.memory_bytes / self.bytes_per_param / self.total_params(1.0, e)

    def tokens(self, n: float) -> float:
        return self.flops / (self.fpt[0] * n ** self.fpt[1])


def best_n(loss_at, budget: Budget, n_max: float = np.inf) -> tuple[float, float]:
    """(N_opt, loss) minimising ``loss_at(N, D)`` along D = C / FLOPs-per-token(N), N <= n_max."""
    hi = min(LOG_N_RANGE[1], np.log(n_max))
    if hi <= LOG_N_RANGE[0]:
        raise BadInput(f"the memory limit allows at most {n_max:.3g} parameters")

    def f(log_n):
        n = np.exp(log_n)
        with np.errstate(all="ignore"):
            value = float(loss_at(n, budget.tokens(n)))
        return value if np.isfinite(value) else 1e300

    res = minimize_scalar(f, bounds=(LOG_N_RANGE[0], hi), method="bounded",
                          options={"xatol": 1e-9})
    return float(np.exp(res.x)), float(res.fun)


def dense_optimum(predict, p: dict, budget: Budget) -> dict:
    """N_opt, D_opt and the predicted loss for a law in (N, D)."""
    n_max = budget.max_active(1)
    n_opt, loss = best_n(lambda n, d: predict({"n": n, "d": d}, p), budget, n_max)
    return {"n_opt": n_opt, "d_opt": budget.tokens(n_opt), "loss": loss,
            "tokens_per_param": budget.tokens(n_opt) / n_opt,
            "memory_bound": bool(np.isfinite(n_max) and n_opt > 0.999 * n_max)}


def expert_optimum(predict, p: dict, budget: Budget) -> dict:
    """Best E (from ``budget.experts``), active N_opt and D_opt for a law in (N, D, E)."""
    rows = []
    for e in budget.experts:
        n_max = budget.max_active(e)
        try:
            n_opt, loss = best_n(lambda n, d, e=e: predict({"n": n, "d": d, "e": e}, p),
                                 budget, n_max)
        except ValueError:
            continue
        rows.append({"experts": int(e), "n_active_opt": n_opt, "d_opt": budget.tokens(n_opt),
                     "n_total": budget.total_params(n_opt, e), "loss": loss,
                     "memory_bound": bool(np.isfinite(n_max) and n_opt > 0.999 * n_max)})
    if not rows:
        raise BadInput("no expert count fits in the memory limit")
    best = min(rows, key=lambda r: r["loss"])
    return {**best, "by_experts": rows}

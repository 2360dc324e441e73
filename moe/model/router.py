"""Top-k token router with the Switch/GShard load-balance loss and the router z-loss.

Shape legend: T tokens (batch and sequence flattened), D model width, E experts,
K experts per token (top-k).

Both auxiliary losses and the routing statistics are *returned* (a
`RouterOutput`), never stored on the module, so the caller decides what to sum
and log, and nothing leaks between forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import top_k_fits
from moe.errors import BadConfig


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer routing statistics over the real tokens of a batch.

    Held as detached tensors so the forward pass never synchronises with the
    device; the float views are computed when someone reads them (logging).
    """

    tokens_per_expert_E: torch.Tensor
    """Token-slots sent to each expert (int64)."""
    entropy_mean: torch.Tensor
    """Mean entropy (nats) of the router's softmax; log(E) for a uniform router (0-d)."""

    @property
    def max_over_mean_load(self) -> float:
        """max_i tokens_i / mean_i tokens_i: 1.0 is perfect balance, E is total collapse."""
        counts = self.tokens_per_expert_E.float()
        mean = counts.mean().item()
        return counts.max().item() / mean if mean > 0 else float("nan")

    @property
    def entropy(self) -> float:
        return float(self.entropy_mean.item())


@dataclass(frozen=True)
class RouterOutput:
    expert_idx_TK: torch.Tensor
    """Chosen experts per token, int64 [T, K], best first."""
    weight_TK: torch.Tensor
    """Combine weight of each chosen expert [T, K] (fp32)."""
    lb_loss: torch.Tensor
    """Switch/GShard load-balance loss E * sum_i f_i P_i (scalar; 1.0 when uniform)."""
    z_loss: torch.Tensor
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (scalar)."""
    stats: RoutingStats
    prob_sum_E: torch.Tensor | None = None
    """Sum over the real tokens of the router probabilities [E] (fp32, differentiable): with
    the token counts in `stats` it forms a load-balance loss over many batches
    (`moe.train.balance`)."""


def _token_weights(n_tokens: int, mask_T: torch.Tensor | None,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [T] 1.0 for real tokens else 0.0, number of real tokens >= 1, as a tensor).

    Masks are applied as weights, never by boolean indexing: indexing has a
    data-dependent shape, which syncs with the device and breaks torch.compile graphs.
    """
    if mask_T is None:
        keep_T = torch.ones(n_tokens, dtype=torch.float32, device=like.device)
    else:
        keep_T = mask_T.to(torch.float32)
    return keep_T, keep_T.sum().clamp_min(1.0)


def load_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                      mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer (Fedus et al. 2021) / GShard load-balance loss.

    `E * sum_i f_i * P_i` where f_i is the fraction of the routed token-slots
    (T*K of them) that go to expert i and P_i the mean router probability of
    expert i, both over the real tokens (`mask_T`). f is a count, so the
    gradient flows through P only, pushing probability away from overloaded
    experts. Perfectly uniform routing gives exactly 1.0; no real token gives 0.
    """
    n_tokens, n_experts = probs_TE.shape
    keep_T, n_real = _token_weights(n_tokens, mask_T, probs_TE)
    counts_E = _expert_counts(expert_idx_TK, keep_T, n_experts)
    prob_sum_E = (probs_TE * keep_T.unsqueeze(-1)).sum(dim=0)
    return _switch_loss(counts_E, prob_sum_E, n_real, expert_idx_TK.shape[1])


def _switch_loss(counts_E: torch.Tensor, prob_sum_E: torch.Tensor, n_real: torch.Tensor,
                 top_k: int) -> torch.Tensor:
    """E * sum_i f_i P_i from the slot counts and the summed probabilities of real tokens."""
    f_E = counts_E.to(prob_sum_E.dtype) / (n_real * top_k)
    p_E = prob_sum_E / n_real
    return counts_E.shape[0] * torch.sum(f_E * p_E)


def _expert_counts(expert_idx_TK: torch.Tensor, keep_T: torch.Tensor,
                   n_experts: int) -> torch.Tensor:
    """int64 [E]: routed slots of real tokens per expert (an exact integer scatter-add)."""
    keep_S = keep_T.to(torch.int64).unsqueeze(-1).expand_as(expert_idx_TK).reshape(-1)
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=expert_idx_TK.device)
    return counts_E.scatter_add_(0, expert_idx_TK.reshape(-1), keep_S)


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE): mean_t logsumexp(logits_t)^2 over real tokens.

    Keeps router logits small, which keeps the softmax numerically stable.
    """
    return _z_loss(logits_TE, *_token_weights(logits_TE.shape[0], mask_T, logits_TE))


def _z_loss(logits_TE: torch.Tensor, keep_T: torch.Tensor, n_real: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(logits_TE, dim=-1).pow(2) * keep_T).sum() / n_real


def top_k_choices(probs_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K], experts [T, K]): each token's K most probable experts, most probable
    first, and their probabilities (differentiable).

    K = 1 is a max (on a tie, the lowest expert index: `torch.max`'s documented rule); CPU
    `torch.topk` runs a partial sort per row, about eight times as long at E = 32 (0.77 ms
    against 0.095 ms for 2048 tokens, one thread; benchmarks/results/bench_cpu_ops.txt),
    twice per step, about 4% of a d_model-32 pocket step.
    """
    if top_k == 1:
        weight_T1, expert_T1 = probs_TE.max(dim=-1, keepdim=True)
        return weight_T1, expert_T1
    return torch.topk(probs_TE, top_k, dim=-1)


class TopKRouter(nn.Module):
    """Linear D -> E (no bias), softmax over experts, top-k.

    `normalize=True` renormalises the k weights to sum to 1 (Mixtral) when
    k > 1; with k = 1 the weight is always the router probability (Switch
    Transformer), since a renormalised single weight is exactly 1 and the
    language-model loss would give the router no gradient. `normalize=False`
    keeps the raw softmax probabilities (OLMoE). Logits, softmax and weights are
    fp32 even under autocast: small logit differences decide routing.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, *, normalize: bool = True):
        super().__init__()
        if top_k < 1 or not top_k_fits(top_k, n_experts):
            raise BadConfig(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
        self.n_experts = n_experts
        self.top_k = top_k
        self.normalize = normalize
        self.weight_ED = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> RouterOutput:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight_ED.float())
            probs_TE = torch.softmax(logits_TE, dim=-1)
            weight_TK, expert_idx_TK = top_k_choices(probs_TE, self.top_k)
            if self.normalize and self.top_k > 1:
                weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
            # the real tokens, their slot counts and summed probabilities once, shared by
            # both losses and the statistics (the same ops as the functions above)
            keep_T, n_real = _token_weights(probs_TE.shape[0], mask_T, probs_TE)
            counts_E = _expert_counts(expert_idx_TK, keep_T, self.n_experts)
            prob_sum_E = (probs_TE * keep_T.unsqueeze(-1)).sum(dim=0)
            lb = _switch_loss(counts_E, prob_sum_E, n_real, self.top_k)
            zl = _z_loss(logits_TE, keep_T, n_real)
            stats = _routing_stats(probs_TE.detach(), counts_E, keep_T, n_real)
        return RouterOutput(expert_idx_TK=expert_idx_TK, weight_TK=weight_TK, lb_loss=lb,
                            z_loss=zl, stats=stats, prob_sum_E=prob_sum_E)


def routing_stats(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                  mask_T: torch.Tensor | None = None) -> RoutingStats:
    n_tokens, n_experts = probs_TE.shape
    keep_T, n_real = _token_weights(n_tokens, mask_T, probs_TE)
    return _routing_stats(probs_TE, _expert_counts(expert_idx_TK, keep_T, n_experts), keep_T,
                          n_real)


def _routing_stats(probs_TE: torch.Tensor, counts_E: torch.Tensor, keep_T: torch.Tensor,
                   n_real: torch.Tensor) -> RoutingStats:
    entropy_T = -(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1)
    entropy = (entropy_T * keep_T).sum() / n_real
    entropy = torch.where(keep_T.sum() > 0, entropy, torch.full_like(entropy, float("nan")))
    return RoutingStats(tokens_per_expert_E=counts_E.detach(), entropy_mean=entropy.detach())

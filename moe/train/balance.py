"""The load-balance loss of a whole optimizer step: over its micro-batches and ranks.

For MoE layer l (of L) with E experts and top-k K, over the N real tokens of the step's
global batch (all `grad_accum` = A micro-batches on all W data-parallel ranks):

    c_li = token-slots routed to expert i              (a count: no gradient)
    f_li = c_li / (K N)                                 (fraction of the step's slots)
    P_li = (1/N) sum_t p_tli                            (mean router probability)
    LB   = (1/L) sum_l E sum_i f_li P_li                (1.0 when perfectly uniform)

Micro-batch m on rank r contributes the differentiable term

    lb_mr = A W (1/L) sum_l E sum_i f_li S_mrli / N,    S_mrli = sum of p_tli over its tokens,

whose mean over the A micro-batches and W ranks -- what gradient accumulation (loss / A)
and data-parallel gradient averaging compute -- is exactly LB. So the objective does not
depend on how the global batch is split: 1 process x grad_accum 2 and 2 processes x
grad_accum 1 optimise the same loss. With A = W = 1 it is the Switch loss of
`moe.model.router.load_balance_loss`.

The counts c are needed before the step's first backward. With A = 1 they come from the
forward itself (one all-reduce of L x E integers); with A > 1 `count_step_routing` runs a
no-grad forward over the step's micro-batches first (one extra forward per step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from moe.model import ModelOutput


def routing_counts(out: ModelOutput) -> torch.Tensor:
    """Token-slots per expert of every MoE layer of one forward: int64 [L, E] (L may be 0)."""
    if not out.routing:
        return torch.zeros(0, 0, dtype=torch.int64)
    return torch.stack([s.tokens_per_expert_E for s in out.routing])


def all_ranks_sum(counts_LE: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over the data-parallel ranks (every rank of the job)."""
    if world > 1 and counts_LE.numel():
        counts_LE = counts_LE.clone()
        dist.all_reduce(counts_LE)
    return counts_LE


@torch.no_grad()
def count_step_routing(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                       world: int, forward: Callable | None = None) -> torch.Tensor:
    """Counts [L, E] of a whole step: a no-grad forward over this rank's micro-batches."""
    total = None
    for x, y in batches:
        out = forward(x, y) if forward is not None else model(x, y)
        counts = routing_counts(out)
        total = counts if total is None else total + counts
    assert total is not None, "a step has at least one micro-batch"
    return all_ranks_sum(total, world)


def step_balance_term(out: ModelOutput, counts_LE: torch.Tensor, top_k: int,
                      n_parts: int) -> torch.Tensor:
    """lb_mr above: this micro-batch's share of the step's load-balance loss.

    `counts_LE` are the step's global counts; `n_parts` = A x W.
    """
    if not out.prob_sums:
        return out.lb_loss  # a dense model: zero
    prob_sum_LE = torch.stack(list(out.prob_sums)).float()
    n_layers, n_experts = prob_sum_LE.shape
    counts = counts_LE.to(prob_sum_LE.device, torch.float32)
    # every real token fills top_k slots in every layer; with none, f = 0 and the term is 0
    # (a clamp, not an `if`: a Python branch on a device tensor waits for the device)
    n_tokens = (counts[0].sum() / top_k).clamp_min(1.0)
    f_LE = counts / (top_k * n_tokens)
    return n_parts * n_experts * (f_LE * prob_sum_LE).sum() / (n_tokens * n_layers)

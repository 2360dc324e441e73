"""Expert parallelism: each rank of an expert group holds E/P experts; tokens travel by all-to-all.

`make_expert_parallel(experts, group)` turns an experts module in place into its
expert-parallel form: every parameter (all have a leading expert dimension, whatever
their names: `w1_EDH`, `w13_ED2H`, ...) keeps only this rank's block of E/P experts, and
the forward becomes

    sort the T*K (token, slot) pairs by expert -> all_to_all rows to the ranks that own
    their experts -> the module's own forward on the received rows (each row to one local
    expert with weight 1) -> all_to_all the outputs back -> weight by the router and sum
    into token order.

Both exchanges are torch's autograd all-to-all (`all_to_all_single_autograd`, what
`torch.distributed.nn.functional.all_to_all_single` now defers to), which is
differentiable, so gradients take the same way back. Dropless: every slot reaches its
expert (the split sizes come from an all-to-all of the per-expert counts). The source
rank sorts and combines exactly like `moe.model.experts` does on one process, so an
expert-parallel model computes what the single-process model does.

Shape legend: T tokens, K top-k, S = T*K slots (this rank's, expert-sorted), R rows
received from the group, D model width, E experts, P group size, El = E/P local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moe.errors import BadConfig


class ExpertParallel:
    """Mixin placed in front of an experts class by `make_expert_parallel`."""

    ep_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    n_experts_global: int

    def forward(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor,
                weight_TK: torch.Tensor) -> torch.Tensor:
        n_tokens, top_k = expert_idx_TK.shape
        flat_S = expert_idx_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        token_S = order_S // top_k
        counts_E = torch.bincount(flat_S, minlength=self.n_experts_global)
        recv_counts_E = torch.empty_like(counts_E)  # [P * El]: from each source, per local expert
        dist.all_to_all_single(recv_counts_E, counts_E, group=self.ep_group)
        n_local = self.n_experts_global // self.ep_size
        recv_PL = recv_counts_E.view(self.ep_size, n_local)
        send_splits = counts_E.view(self.ep_size, n_local).sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        x_SD = x_TD[token_S]
        x_RD = _all_to_all(x_SD, recv_splits, send_splits, self.ep_group)
        local_R = torch.arange(n_local, device=x_TD.device).repeat(self.ep_size)
        local_R = torch.repeat_interleave(local_R, recv_PL.reshape(-1))
        y_RD = self._local_experts(x_RD, local_R)
        y_SD = _all_to_all(y_RD, send_splits, recv_splits, self.ep_group)
        weight_S = weight_TK.reshape(-1)[order_S]
        y_SD = y_SD * weight_S.to(y_SD.dtype).unsqueeze(-1)
        return y_SD.new_zeros(n_tokens, y_SD.shape[1]).index_add(0, token_S, y_SD)

    def _local_experts(self, x_RD: torch.Tensor, local_R: torch.Tensor) -> torch.Tensor:
        if x_RD.shape[0] == 0:  # nothing arrived: keep every weight in the graph (zero grads)
            anchor = sum(p.sum() for p in self.parameters())  # type: ignore[attr-defined]
            return x_RD + anchor * 0.0
        ones_R1 = torch.ones(x_RD.shape[0], 1, dtype=torch.float32, device=x_RD.device)
        return super().forward(x_RD, local_R.unsqueeze(1), ones_R1)  # type: ignore[misc]


def _all_to_all(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-to-all of rows (the backward sends the gradients the other way)."""
    from torch.distributed._functional_collectives import wait_tensor

    return wait_tensor(all_to_all_single_autograd(x_ND.contiguous(), out_splits, in_splits,
                                                  group))


def expert_block(n_experts: int, ep_size: int, ep_rank: int) -> slice:
    """The experts rank `ep_rank` of a group of `ep_size` holds."""
    if n_experts % ep_size:
        raise BadConfig(f"model.n_experts={n_experts} must be divisible by "
                         f"parallel.expert={ep_size}")
    n_local = n_experts // ep_size
    return slice(ep_rank * n_local, (ep_rank + 1) * n_local)


def make_expert_parallel(experts: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Keep this rank's experts in `experts` and make its forward expert-parallel (in place)."""
    params = dict(experts.named_parameters(recurse=False))
    n_experts = next(iter(params.values())).shape[0]
    if any(p.shape[0] != n_experts for p in params.values()) or list(experts.children()):
        raise BadConfig(f"{type(experts).__name__}: expert parallelism needs every weight "
                         "to lead with the expert dimension")
    ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    rows = expert_block(n_experts, ep_size, ep_rank)
    for name, p in params.items():
        setattr(experts, name, nn.Parameter(p.detach()[rows].clone(),
                                            requires_grad=p.requires_grad))
    cls = type(experts)
    experts.__class__ = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
    experts.ep_group, experts.ep_size, experts.ep_rank = group, ep_size, ep_rank
    experts.n_experts_global = n_experts
    if isinstance(experts.__dict__.get("n_experts"), int):  # a stored count, not a property
        experts.n_experts = rows.stop - rows.start
    return experts


def is_expert_parallel(module: nn.Module) -> bool:
    return isinstance(module, ExpertParallel)

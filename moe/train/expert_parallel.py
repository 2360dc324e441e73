"""Expert parallelism: each rank of an expert group holds E/P experts; tokens travel by all-to-all.

`make_expert_parallel(experts, group)` turns an experts module in place into its
expert-parallel form: every parameter (all have a leading expert dimension, whatever
their names: `w1_EDH`, `w13_ED2H`, ...) keeps only this rank's block of E/P experts, and
the forward becomes

    sort the T*K (token, slot) pairs by expert -> all_to_all rows (in the compute dtype:
    bf16 under autocast) to the ranks that own their experts -> the module's own backend
    on the received rows (each row to one local expert) -> all_to_all the outputs back ->
    unsort and combine in fp32 with the single-process reshape-sum (no `index_add`, whose
    atomics make CUDA sums order-dependent).

One host read per layer: the split sizes of both exchanges, copied together.

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
from moe.kernels.permute import dispatch_rows, unsort_rows
from moe.model.experts import combine, compute_dtype, make_dispatch_plan


class ExpertParallel:
    """Mixin placed in front of an experts class by `make_expert_parallel`."""

    ep_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    n_experts_global: int

    def forward(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor,
                weight_TK: torch.Tensor) -> torch.Tensor:
        """fp32 [T, D], as `SwiGLUExperts.forward`: rows travel in the compute dtype (bf16
        under autocast), the combine is the single-process reshape-sum (no atomics)."""
        plan = make_dispatch_plan(expert_idx_TK, weight_TK, self.n_experts_global)
        n_local = self.n_experts_global // self.ep_size
        recv_counts_E = torch.empty_like(plan.counts_E)  # [P * El]: per source, local expert
        dist.all_to_all_single(recv_counts_E, plan.counts_E, group=self.ep_group)
        recv_PL = recv_counts_E.view(self.ep_size, n_local)
        # the one host read of the layer: both exchanges' split sizes in one copy
        splits = torch.cat([plan.counts_E.view(self.ep_size, n_local).sum(1),
                            recv_PL.sum(1)]).tolist()
        send_splits, recv_splits = splits[: self.ep_size], splits[self.ep_size:]
        x_TD = x_TD.to(compute_dtype(x_TD.device.type, x_TD.dtype))
        x_SD = dispatch_rows(x_TD, plan.slot_order_S, plan.inverse_S, plan.top_k)
        x_RD = _all_to_all(x_SD, recv_splits, send_splits, self.ep_group)
        local_R = torch.arange(n_local, device=x_TD.device).repeat(self.ep_size)
        local_R = torch.repeat_interleave(local_R, recv_PL.reshape(-1),
                                          output_size=sum(recv_splits))
        y_RD = self._local_experts(x_RD, local_R)
        y_SD = _all_to_all(y_RD, send_splits, recv_splits, self.ep_group)
        y_SD = unsort_rows(y_SD, plan.slot_order_S, plan.inverse_S)  # flat [T*K] slot order
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return combine(y_SD, plan.weight_TK)

    def _local_experts(self, x_RD: torch.Tensor, local_R: torch.Tensor) -> torch.Tensor:
        """Each received row through its local expert: [R, D] in the rows' dtype, unweighted."""
        if x_RD.shape[0] == 0:  # nothing arrived: keep every weight in the graph (zero grads)
            anchor = sum(p.sum() for p in self.parameters())  # type: ignore[attr-defined]
            return x_RD + (anchor * 0.0).to(x_RD.dtype)
        ones_R1 = torch.ones(x_RD.shape[0], 1, dtype=torch.float32, device=x_RD.device)
        plan = make_dispatch_plan(local_R.unsqueeze(1), ones_R1, self.n_local_experts)
        fn = self._backend_fn(x_RD)  # type: ignore[attr-defined]
        x_RD, w13_ED2H, w2_EHD = self._cast(x_RD)  # type: ignore[attr-defined]
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            return fn(x_RD, plan, w13_ED2H, w2_EHD)

    @property
    def n_local_experts(self) -> int:
        return self.n_experts_global // self.ep_size


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

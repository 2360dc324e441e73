"""Expert backends `triton` and `megablocks` for `moe.model.experts` (its backend signature).

Shape legend: T tokens, D model width, H expert hidden width, E experts,
K experts per token, S = T*K routed token-slots (sorted by expert in `plan`).

Every backend returns, for each flat slot t*K + j, SwiGLU_e(x_t) of token t's
j-th expert e, with SwiGLU_e(x) = (silu(x W1_e) * (x W3_e)) W2_e and gate/up
fused as w13 = [W1 | W3]; the caller weights and sums each token's K rows (in
fp32, deterministic). Backends run in the dtype of their inputs (the experts
layer casts at its boundary) and are differentiable w.r.t. x and the weights.

Dispatch in the `triton` backend is copy-free, as in ScatterMoE: the first
expert matmul reads x's rows through the routing's flat slots (`plan.slot_order_S`
with fanout K) inside the kernel (no permuted [S, D] copy of x), and the last one
writes each slot's row straight to its place in the flat [T*K] order, so there is
no un-permute pass and no atomics in the forward or the backward. The
alternative (separate permute/unpermute kernels around a plain grouped GEMM)
costs two extra [S, D] round trips through memory; which is faster can only be
measured on a GPU.

`plan` is duck-typed (slot_order_S, inverse_S, offs_E, counts_E, top_k) so this
package never imports `moe.model`.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from moe.errors import MissingResource
from moe.kernels.grouped_gemm import gather_scatter_mm
from moe.kernels.permute import unsort_rows


class BackendUnavailableError(MissingResource):
    """An optional expert backend cannot run here; the message says what to install."""


def triton_experts(x_TD: torch.Tensor, plan, w13_ED2H: torch.Tensor,
                   w2_EHD: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on the Triton grouped GEMM with gather/scatter fused into it.

    No host sync: the plan comes from make_dispatch_plan (trusted), so the value
    checks (and their syncs) are skipped, and the kernels read the offsets on the device.
    """
    gate_up_S2H = gather_scatter_mm(x_TD, w13_ED2H, plan.offs_E, plan.slot_order_S, None,
                                    plan.top_k, check_values=False)
    gate_SH, up_SH = gate_up_S2H.chunk(2, dim=-1)
    h_SH = F.silu(gate_SH) * up_SH
    return gather_scatter_mm(h_SH, w2_EHD, plan.offs_E, None, plan.slot_order_S,
                             check_values=False)  # rows land in flat [T*K] order


MEGABLOCKS_HINT = ("the 'megablocks' experts backend needs a CUDA GPU and the packages "
                   "`megablocks` and `grouped_gemm` (pip install megablocks grouped_gemm; "
                   "MegaBlocks 0.10 pins torch 2.7 and builds CUDA code)")


def _import_megablocks():
    """(megablocks.ops, grouped_gemm.ops.gmm), or BackendUnavailableError naming what's missing."""
    try:
        mb_ops = importlib.import_module("megablocks.ops")
        gg_ops = importlib.import_module("grouped_gemm.ops")
    except ImportError as exc:
        raise BackendUnavailableError(f"{MEGABLOCKS_HINT}: {exc}") from None
    return mb_ops, gg_ops.gmm


def megablocks_experts(x_TD: torch.Tensor, plan, w13_ED2H: torch.Tensor,
                       w2_EHD: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on MegaBlocks' gather and grouped GEMM (its dMoE `grouped` path).

    GPU only and bf16 only (grouped_gemm's CUTLASS kernels); not run in this
    project's CI. One host sync per call: grouped_gemm wants the batch sizes on the host.
    """
    if x_TD.device.type != "cuda":
        raise BackendUnavailableError(f"{MEGABLOCKS_HINT}; got a tensor on {x_TD.device}")
    mb_ops, gmm = _import_megablocks()
    n_slots = plan.slot_order_S.shape[0]
    # MegaBlocks' names: indices = sorted flat (token, slot) ids, bin_ids = expert of
    # each sorted slot, bins = inclusive cumsum of slots per expert.
    indices = plan.slot_order_S.int()
    n_experts = plan.counts_E.shape[0]
    bin_ids = torch.repeat_interleave(
        torch.arange(n_experts, device=x_TD.device), plan.counts_E, output_size=n_slots).int()
    batch_sizes = plan.counts_E.cpu()  # the host sync
    x_SD = mb_ops.gather(x_TD, indices, bin_ids, plan.offs_E, plan.top_k)
    gate_SH, up_SH = gmm(x_SD, w13_ED2H, batch_sizes).chunk(2, dim=-1)
    y_SD = gmm(F.silu(gate_SH) * up_SH, w2_EHD, batch_sizes)
    return unsort_rows(y_SD, plan.slot_order_S, plan.inverse_S)

"""Expert backends `triton` and `megablocks` for `moe.experts` (same signature as its `loop`).

Shape legend: T tokens, D model width, H expert hidden width, E experts,
K experts per token, S = T*K routed token-slots (sorted by expert in `plan`).

Every backend computes, for each token t, the sum over its K slots s of
weight_s * SwiGLU_e(x_t), with SwiGLU_e(x) = (silu(x W1_e) * (x W3_e)) W2_e, and
is differentiable w.r.t. x, the three weights and `plan.weight_S`.

Dispatch in the `triton` backend is copy-free, as in ScatterMoE: the two first
expert matmuls read x's rows through `plan.token_idx_S` inside the kernel (no
permuted [S, D] copy of x), and the last one writes each slot's row straight to
its place in the flattened [T, K] routing (`plan.slot_order_S`), so combining is
a [T, 1, K] x [T, K, D] batched matmul with the router weights: deterministic,
no atomics, no un-permute pass. The alternative (separate permute/unpermute
kernels around a plain grouped GEMM) costs two extra [S, D] round trips through
memory; which is faster can only be measured on a GPU, which we did not have.

`plan` is duck-typed (token_idx_S, weight_S, offs_E, counts_E, slot_order_S) so
this package never imports `moe`.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from moe.kernels.grouped_gemm import gather_scatter_mm


class BackendUnavailableError(ValueError):
    """An optional expert backend cannot run here; the message says what to install."""


def _top_k(plan, n_tokens: int) -> int:
    return plan.token_idx_S.shape[0] // max(n_tokens, 1)


def _routing_weights_TK(plan, n_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Router weights in flattened [T, K] order (differentiable w.r.t. plan.weight_S)."""
    weight_S = plan.weight_S.to(dtype)
    flat = weight_S.new_zeros(weight_S.shape[0]).index_copy(0, plan.slot_order_S, weight_S)
    return flat.view(n_tokens, _top_k(plan, n_tokens))


def triton_experts(x_TD: torch.Tensor, plan, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor,
                   w2_EHD: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on the Triton grouped GEMM with gather/scatter fused into it."""
    n_tokens, d_model = x_TD.shape
    dtype = x_TD.dtype
    w1, w3, w2 = (w.to(dtype) for w in (w1_EDH, w3_EDH, w2_EHD))  # autocast does not cover it
    # The plan comes from make_dispatch_plan (trusted): skip the value checks and their syncs.
    gate_SH = gather_scatter_mm(x_TD, w1, plan.offs_E, plan.token_idx_S, check_values=False)
    up_SH = gather_scatter_mm(x_TD, w3, plan.offs_E, plan.token_idx_S, check_values=False)
    h_SH = F.silu(gate_SH) * up_SH
    y_SD = gather_scatter_mm(h_SH, w2, plan.offs_E, None, plan.slot_order_S,
                             check_values=False)  # rows already in [T, K] order
    weight_TK = _routing_weights_TK(plan, n_tokens, dtype)
    y_TKD = y_SD.view(n_tokens, _top_k(plan, n_tokens), d_model)
    return torch.bmm(weight_TK.unsqueeze(1), y_TKD).squeeze(1)


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


def megablocks_experts(x_TD: torch.Tensor, plan, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor,
                       w2_EHD: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on MegaBlocks' gather/scatter and grouped GEMM (its dMoE `grouped` path).

    GPU only and bf16 only (grouped_gemm's CUTLASS kernels); not run in this
    project's CI. Costs one host sync per call (grouped_gemm wants batch sizes on CPU).
    """
    if x_TD.device.type != "cuda":
        raise BackendUnavailableError(f"{MEGABLOCKS_HINT}; got a tensor on {x_TD.device}")
    mb_ops, gmm = _import_megablocks()
    n_tokens = x_TD.shape[0]
    n_slots = plan.token_idx_S.shape[0]
    top_k = _top_k(plan, n_tokens)
    dtype = x_TD.dtype
    w1, w3, w2 = (w.to(dtype) for w in (w1_EDH, w3_EDH, w2_EHD))
    # MegaBlocks' names: indices = sorted flat (token, slot) ids, bin_ids = expert of
    # each sorted slot, bins = inclusive cumsum of slots per expert.
    indices = plan.slot_order_S.int()
    n_experts = plan.counts_E.shape[0]
    bin_ids = torch.repeat_interleave(
        torch.arange(n_experts, device=x_TD.device), plan.counts_E, output_size=n_slots).int()
    bins = plan.offs_E
    batch_sizes = plan.counts_E.cpu()
    x_SD = mb_ops.gather(x_TD, indices, bin_ids, bins, top_k)
    h_SH = F.silu(gmm(x_SD, w1, batch_sizes)) * gmm(x_SD, w3, batch_sizes)
    y_SD = gmm(h_SH, w2, batch_sizes)
    weight_flat = _routing_weights_TK(plan, n_tokens, dtype).reshape(-1)
    return mb_ops.scatter(y_SD, indices, bin_ids, weight_flat, bins, top_k)

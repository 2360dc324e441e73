"""Deterministic row permutations between token order and expert-sorted order.

Shape legend: T tokens, K experts per token, D width, S = T*K routed token-slots.

A routing of T tokens to K experts each has S = T*K slots; flat slot t*K + j is
token t's j-th choice. `slot_order_S` lists the flat slots sorted by expert and
`inverse_S` is its inverse permutation. Both directions are plain gathers, and so
are their backward passes: the gradient of the dispatch writes every slot to its
own row of a [T*K, D] buffer and sums over K with a reshape, so no row is ever
accumulated with `index_add` (atomics on CUDA) and two identical passes give
bitwise-identical results. Gathers are `index_select`, not advanced indexing: the same
rows, 5-6x faster on CPU (16384 x 32 fp32 rows: 53 us against 314 us, one thread).
"""

from __future__ import annotations

import torch


class _DispatchRows(torch.autograd.Function):
    """x_SD[s] = x_TD[slot_order_S[s] // K]: each token's row copied to its K sorted slots."""

    @staticmethod
    def forward(ctx, x_TD, slot_order_S, inverse_S, top_k: int):
        ctx.save_for_backward(inverse_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, torch.div(slot_order_S, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, dx_SD):
        (inverse_S,) = ctx.saved_tensors
        dx_flat_SD = dx_SD.index_select(0, inverse_S)  # back to flat [T, K] slot order
        n_slots, width = dx_flat_SD.shape
        return dx_flat_SD.view(n_slots // ctx.top_k, ctx.top_k, width).sum(1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """y[i] = x[order[i]] for a permutation `order` whose inverse is `inverse`."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, dy):
        (inverse,) = ctx.saved_tensors
        return dy.index_select(0, inverse), None, None


def dispatch_rows(x_TD: torch.Tensor, slot_order_S: torch.Tensor, inverse_S: torch.Tensor,
                  top_k: int) -> torch.Tensor:
    """[S, D] expert-sorted copy of the rows of x_TD (token slot_order_S[s] // K at row s)."""
    return _DispatchRows.apply(x_TD, slot_order_S, inverse_S, top_k)


def unsort_rows(y_SD: torch.Tensor, slot_order_S: torch.Tensor,
                inverse_S: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows back to flat [T*K] slot order (row t*K + j: token t, choice j)."""
    return _PermuteRows.apply(y_SD, inverse_S, slot_order_S)

"""torch's grouped matmul as a `torch.library` custom op, so torch.compile sees through it.

Shape legend: M sorted rows, K input width, N output width, E groups.

`torch.nn.functional.grouped_mm` runs fp32 and bf16 on CPU, but its meta
function (what torch.compile traces with) accepts bf16 only, so an fp32 model
would break the graph. Wrapped as an opaque custom op with a fake impl, the
compiled graph calls the eager kernel for any dtype. The backward is two more
calls of the same ops (dA with B transposed; dB as the 2-D x 2-D grouped form),
so it compiles too. Neither op reads `offs` on the host: no device sync.

Outside torch.compile the same kernels run through a plain `autograd.Function`
(`_EagerGroupedMM`): the custom op's Python dispatch cost about 150 us per forward and
backward on CPU, 1-2% of a pocket step. Both paths call the same kernels with the same
arguments, so their results are bitwise equal (tests/test_experts.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_fn():
    """torch's grouped matmul, or None in a torch that has none."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[M, K] x [E, K, N] -> [M, N]; rows of group e are [offs[e-1], offs[e])."""
    return grouped_mm_fn()(a, b, offs=offs)


def _mm_dw(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[M, K], [M, N] -> [E, K, N] with dw[e] = a[rows_e]^T dy[rows_e] (0 for empty groups)."""
    return grouped_mm_fn()(a.t(), dy, offs=offs)


@torch.library.custom_op("moe_kernels::torch_grouped_mm", mutates_args=())
def _torch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """:func:`_mm` as an op torch.compile traces."""
    return _mm(a, b, offs)


@_torch_grouped_mm.register_fake
def _torch_grouped_mm_fake(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("moe_kernels::torch_grouped_mm_dw", mutates_args=())
def _torch_grouped_mm_dw(a: torch.Tensor, dy: torch.Tensor,
                         offs: torch.Tensor) -> torch.Tensor:
    """:func:`_mm_dw` as an op torch.compile traces."""
    return _mm_dw(a, dy, offs)


@_torch_grouped_mm_dw.register_fake
def _torch_grouped_mm_dw_fake(a, dy, offs):
    return a.new_empty(offs.shape[0], a.shape[1], dy.shape[1])


def _setup_context(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grads(ctx, dy, mm, mm_dw):
    """(dA, dB, None): dA = dy B^T per group, dB[e] = A_e^T dy_e, each only where needed."""
    a, b, offs = ctx.saved_tensors
    da = mm(dy, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    db = mm_dw(a, dy, offs) if ctx.needs_input_grad[1] else None
    return da, db, None


def _backward(ctx, dy):
    return _grads(ctx, dy, _torch_grouped_mm, _torch_grouped_mm_dw)


_torch_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupedMM(torch.autograd.Function):
    """The custom op's forward and backward, without its dispatch (eager mode only)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        return _mm(a, b, offs)

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _mm, _mm_dw)


def torch_grouped_mm(a_MK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`torch.nn.functional.grouped_mm(a, b, offs=offs)`, differentiable and compilable."""
    if torch.compiler.is_compiling():
        return _torch_grouped_mm(a_MK, b_EKN, offs_E)
    return _EagerGroupedMM.apply(a_MK, b_EKN, offs_E)

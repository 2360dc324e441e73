"""SwiGLU experts over a grouped-matmul backend: Dispatch -> Experts -> Combine.

Shape legend: T tokens, D model width, H expert hidden width, E experts,
K experts per token, S = T*K routed token-slots.

Every expert computes SwiGLU(x) = (silu(x W1_e) * (x W3_e)) W2_e; gate and up
are stored side by side as one weight `w13_ED2H` = [W1 | W3] (one matmul, no
concatenation per forward) and down as `w2_EHD`. Dispatch sorts the S (token,
slot) pairs by expert; a *backend* computes every slot's expert output and
returns it in flat [T*K] slot order; the combine then weights and sums each
token's K rows in fp32 with a reshape-sum (no `index_add`, so no atomics, in
the forward or the backward: deterministic). All backends share one signature,
`fn(x_TD, plan, w13_ED2H, w2_EHD) -> y_SD`, so a new kernel replaces one function:

- `loop`: one matmul per expert; the readable reference.
- `torch`: torch's grouped_mm (as the custom op `moe_kernels::torch_grouped_mm`,
  which torch.compile traces in any dtype) on the expert-sorted rows; falls back
  to `loop` where torch's kernel cannot take the shapes (row strides must be
  multiples of 16 bytes; bf16 on CUDA).
- `triton`: Triton grouped GEMM that gathers and scatters rows in the kernel
  (`moe.kernels.moe_experts`), CUDA only.
- `megablocks`: MegaBlocks' grouped GEMM (optional, GPU only, lazily imported).
- `auto`: `triton` on CUDA when Triton imports and D, H are multiples of 16,
  else `torch` (which itself falls back to `loop` where grouped_mm is missing or
  the shapes do not suit it). On CPU, `torch` and `loop` train pocket-tiny at
  the same speed within 2% (benchmarks/bench_train.py).

Host syncs in a forward: none on `torch` and `triton`. The `loop` backend reads
the per-expert row counts on the host (`counts_E.tolist()`, for torch.split) and
`megablocks` copies them to the host (`counts_E.cpu()`, grouped_gemm's batch
sizes); those are the only device->host transfers of the expert layer.

Routing is dropless: every token reaches all of its K experts.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import EXPERT_BACKENDS
from moe.errors import BadConfig, BadInput, MissingResource
from moe.kernels.permute import dispatch_rows, unsort_rows
from moe.kernels.torch_grouped import grouped_mm_fn, torch_grouped_mm


@dataclass(frozen=True)
class DispatchPlan:
    """The S = T*K routed token-slots, sorted by expert (flat slot t*K + j: token t, choice j)."""

    slot_order_S: torch.Tensor
    """int64 [S]: flat slot of each expert-sorted row."""
    inverse_S: torch.Tensor
    """int64 [S]: expert-sorted row of each flat slot (the inverse permutation)."""
    offs_E: torch.Tensor
    """int32 [E]: cumulative END offset of each expert's rows (grouped_mm convention)."""
    counts_E: torch.Tensor
    """int64 [E]: rows per expert."""
    weight_TK: torch.Tensor
    """fp32 [T, K]: router weight of each slot (differentiable)."""

    @property
    def top_k(self) -> int:
        return self.weight_TK.shape[1]

    @property
    def token_idx_S(self) -> torch.Tensor:
        """int64 [S]: source token of each expert-sorted row."""
        return torch.div(self.slot_order_S, self.top_k, rounding_mode="floor")


def make_dispatch_plan(expert_idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                       n_experts: int) -> DispatchPlan:
    """Sort the (token, slot) pairs by expert (stable: token order within an expert).

    No host sync and no data-dependent shapes, so it compiles into one graph;
    the counts are integer scatter-adds (exact, hence deterministic).
    """
    flat_expert_S = expert_idx_TK.reshape(-1)
    slot_order_S = torch.argsort(flat_expert_S, stable=True)
    positions_S = torch.arange(slot_order_S.shape[0], device=slot_order_S.device)
    inverse_S = torch.empty_like(slot_order_S).scatter_(0, slot_order_S, positions_S)
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=flat_expert_S.device)
    counts_E = counts_E.scatter_add_(0, flat_expert_S, torch.ones_like(flat_expert_S))
    return DispatchPlan(slot_order_S=slot_order_S, inverse_S=inverse_S,
                        offs_E=torch.cumsum(counts_E, dim=0).to(torch.int32),
                        counts_E=counts_E, weight_TK=weight_TK.float())


ExpertFn = Callable[[torch.Tensor, DispatchPlan, torch.Tensor, torch.Tensor], torch.Tensor]
"""fn(x_TD, plan, w13_ED2H, w2_EHD) -> y_SD: every slot's unweighted expert output, in flat
[T*K] slot order and in the dtype of its inputs (the combine happens outside)."""


def combine(y_SD: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
    """sum_j weight[t, j] * y[t*K + j], in fp32: a reshape-sum, deterministic (no atomics)."""
    n_tokens, top_k = weight_TK.shape
    y_TKD = y_SD.view(n_tokens, top_k, y_SD.shape[-1]).float()
    return (y_TKD * weight_TK.float().unsqueeze(-1)).sum(dim=1)


def swiglu_reference(gate_up_S2H: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused [gate | up] rows, op by op (autograd's own backward)."""
    gate_SH, up_SH = gate_up_S2H.chunk(2, dim=-1)
    return F.silu(gate_SH) * up_SH


CPU_SWIGLU_CONTIGUOUS_MIN_HIDDEN = 96
CPU_SWIGLU_CONTIGUOUS_MIN_ELEMENTS = 1 << 20
"""On CPU, SwiGLU copies the gate half of the [gate | up] rows into a tensor of its own when
H is at least 96 (a multiple of 16) and the rows hold at least 2^20 elements (4 MiB in fp32):
torch's CPU silu
and silu_backward read a half-row view (row stride 2H) far slower than contiguous rows at
top-k's row counts, while the copy costs one pass. Forward + backward, one thread
(benchmarks/results/bench_cpu_ops.txt): 16384 rows of 128, 9.2 ms through the view against
5.9 ms copied; 16384 of 96, 5.8 against 4.3; at 16384 of 64 and 2048 of 128 neither wins
in every run (2.5 against 2.3 ms and 0.38 against 0.42 ms in that one).
Only for H a multiple of 16 (every pocket width): then the vectorised loops over the copy and
over the view compute every element the same way and the values are bitwise equal; at other
widths (H = 100, 104, 120 measured) a row's tail takes torch's scalar path in one and the
vector path in the other, 1-4 ulp apart, so those keep the view."""


def _gate_copied(gate_up_S2H: torch.Tensor) -> bool:
    return (gate_up_S2H.device.type == "cpu"
            and gate_up_S2H.shape[-1] >= 2 * CPU_SWIGLU_CONTIGUOUS_MIN_HIDDEN
            and gate_up_S2H.shape[-1] % 32 == 0
            and gate_up_S2H.numel() >= CPU_SWIGLU_CONTIGUOUS_MIN_ELEMENTS)


class _SwiGLU(torch.autograd.Function):
    """:func:`swiglu_reference` with a backward that writes d gate and d up into the halves of
    one [S, 2H] buffer (autograd's backward of the chunk concatenates them, a copy of every
    row), reading the gate from a contiguous copy where ``copy_gate``
    (`CPU_SWIGLU_CONTIGUOUS_MIN_HIDDEN`). The same kernels on the same values, so outputs and
    gradients are bitwise equal to the reference's (tests/test_experts.py)."""

    @staticmethod
    def forward(ctx, gate_up_S2H, copy_gate: bool):
        gate_SH, up_SH = gate_up_S2H.chunk(2, dim=-1)
        if copy_gate:
            gate_SH = gate_SH.contiguous()
        silu_SH = F.silu(gate_SH)
        ctx.save_for_backward(gate_SH, up_SH, silu_SH)
        return silu_SH * up_SH

    @staticmethod
    def backward(ctx, d_SH):
        gate_SH, up_SH, silu_SH = ctx.saved_tensors
        d_S2H = d_SH.new_empty(d_SH.shape[0], 2 * d_SH.shape[1])
        d_gate_SH, d_up_SH = d_S2H.chunk(2, dim=-1)
        torch.mul(d_SH, silu_SH, out=d_up_SH)
        torch.ops.aten.silu_backward.grad_input(d_SH * up_SH, gate_SH, grad_input=d_gate_SH)
        return d_S2H, None


def _swiglu(gate_up_S2H: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; eager mode writes its gradient without a concatenation (`_SwiGLU`),
    torch.compile traces the op-by-op form (and fuses it itself)."""
    if torch.compiler.is_compiling() or not gate_up_S2H.requires_grad:
        return swiglu_reference(gate_up_S2H)
    return _SwiGLU.apply(gate_up_S2H, _gate_copied(gate_up_S2H))


def _sorted_rows(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    return dispatch_rows(x_TD, plan.slot_order_S, plan.inverse_S, plan.top_k)


def loop_experts(x_TD: torch.Tensor, plan: DispatchPlan, w13_ED2H: torch.Tensor,
                 w2_EHD: torch.Tensor) -> torch.Tensor:
    """Reference backend: gather the sorted rows, one SwiGLU per expert, unsort."""
    x_SD = _sorted_rows(x_TD, plan)
    counts = plan.counts_E.tolist()  # host sync: torch.split needs the sizes on the host
    outs = [_swiglu(rows_SD @ w13_ED2H[e]) @ w2_EHD[e]
            for e, rows_SD in enumerate(torch.split(x_SD, counts)) if counts[e]]
    y_SD = torch.cat(outs) if outs else x_SD.new_zeros(0, w2_EHD.shape[-1])
    return unsort_rows(y_SD, plan.slot_order_S, plan.inverse_S)


def _grouped_mm_ok(x_TD: torch.Tensor, w2_EHD: torch.Tensor) -> bool:
    """torch's grouped_mm needs 16-byte-aligned row strides (D and H), bf16 on CUDA (SM >= 80)."""
    if grouped_mm_fn() is None or (x_TD.is_cuda and x_TD.dtype != torch.bfloat16):
        return False
    size = x_TD.element_size()
    return all((d * size) % 16 == 0 for d in w2_EHD.shape[1:]) and x_TD.shape[0] > 0


def torch_experts(x_TD: torch.Tensor, plan: DispatchPlan, w13_ED2H: torch.Tensor,
                  w2_EHD: torch.Tensor) -> torch.Tensor:
    """torch's grouped_mm over the expert-sorted rows (`loop` where it can't run).

    No host sync: grouped_mm reads the offsets on the device.
    """
    if not _grouped_mm_ok(x_TD, w2_EHD):
        return loop_experts(x_TD, plan, w13_ED2H, w2_EHD)
    x_SD = _sorted_rows(x_TD, plan)
    h_SH = _swiglu(torch_grouped_mm(x_SD, w13_ED2H, plan.offs_E))
    y_SD = torch_grouped_mm(h_SH, w2_EHD, plan.offs_E)
    return unsort_rows(y_SD, plan.slot_order_S, plan.inverse_S)


# name -> "module:function" for lazily imported backends, so importing this
# module never imports Triton or MegaBlocks.
_LAZY_BACKENDS = {
    "triton": "moe.kernels.moe_experts:triton_experts",
    "megablocks": "moe.kernels.moe_experts:megablocks_experts",
}
_EAGER_BACKENDS: dict[str, ExpertFn] = {"loop": loop_experts, "torch": torch_experts}
BACKENDS = EXPERT_BACKENDS  # "auto" and every name implemented above (tests/test_experts.py)


_LOADED: dict[str, ExpertFn] = dict(_EAGER_BACKENDS)
"""Backends by name once imported; a compiled graph only reads this dict (an import would
break the graph), so SwiGLUExperts loads its backend when it is built."""


def get_backend(name: str, device: torch.device | str = "cpu") -> ExpertFn:
    """The expert function for `name`; `auto` picks the fastest available on `device`."""
    if name == "auto":
        name = auto_backend(device)
    if name not in _LOADED:
        _LOADED[name] = _import_backend(name)
    return _LOADED[name]


def _import_backend(name: str) -> ExpertFn:
    if name not in _LAZY_BACKENDS:
        raise BadConfig(f"unknown experts backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, fn_name = _LAZY_BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingResource(f"experts backend {name!r} is unavailable: {exc}") from None
    return getattr(module, fn_name)


def auto_backend(device: torch.device | str) -> str:
    """Fastest backend that runs on `device` (see the module docstring)."""
    return _auto_backend(torch.device(device).type)


_AUTO_BACKENDS: dict[str, str] = {}


@torch.compiler.assume_constant_result  # resolved once, outside any compiled graph
def _auto_backend(device_type: str) -> str:
    if device_type not in _AUTO_BACKENDS:
        _AUTO_BACKENDS[device_type] = _probe_backend(device_type)
    return _AUTO_BACKENDS[device_type]


def _probe_backend(device_type: str) -> str:
    if device_type != "cuda":
        return "torch"
    try:
        importlib.import_module("triton")
        get_backend("triton")
        return "triton"
    except (ImportError, ValueError):
        return "torch" if grouped_mm_fn() is not None else "loop"


TRITON_ALIGN = 16
"""The Triton kernels are built (and checked by `moe kernels compile`) for widths that
are multiples of 16 elements; other widths cannot vectorise their row loads and spill."""


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype where autocast is on for `device_type`, else `dtype`."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts, gate and up fused as w13 [E, D, 2H], down w2 [E, H, D].

    Precision (as torchtitan): activations and weights are cast to the compute
    dtype (the autocast dtype under autocast) where they enter the experts, and
    every backend then runs with autocast off, so all expert matmuls run in that
    dtype on every backend; the router weights and the weighted combine stay fp32.
    Checkpoints with separate `w1_EDH` / `w3_EDH` (before the fused weight) are
    converted when loaded.
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, *, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise BadConfig(f"unknown experts backend {backend!r}; choose one of "
                             f"{', '.join(BACKENDS)}")
        self.backend = backend
        self.w13_ED2H = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_hidden))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.register_load_state_dict_pre_hook(_fuse_gate_up)
        if backend != "auto":
            get_backend(backend)  # import now: an import inside a compiled graph breaks it

    @property
    def n_experts(self) -> int:
        return self.w13_ED2H.shape[0]

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13_ED2H, std=std)
        nn.init.normal_(self.w2_EHD, std=out_std)

    def _backend_fn(self, x_TD: torch.Tensor) -> ExpertFn:
        name = self.backend
        if name == "auto":
            name = auto_backend(x_TD.device)
            dims = (self.w2_EHD.shape[1], self.w2_EHD.shape[2])
            if name == "triton" and any(d % TRITON_ALIGN for d in dims):
                name = "torch"
        return get_backend(name, x_TD.device)

    def _cast(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(x_TD.device.type, x_TD.dtype)
        return x_TD.to(dtype), self.w13_ED2H.to(dtype), self.w2_EHD.to(dtype)

    def forward(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor,
                weight_TK: torch.Tensor) -> torch.Tensor:
        """fp32 [T, D]: sum over each token's K experts of weight * SwiGLU_e(x)."""
        plan = make_dispatch_plan(expert_idx_TK, weight_TK, self.n_experts)
        fn = self._backend_fn(x_TD)
        x_TD, w13_ED2H, w2_EHD = self._cast(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return combine(fn(x_TD, plan, w13_ED2H, w2_EHD), plan.weight_TK)

    def dense_forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The single expert applied to every token with weight 1 (a dense SwiGLU FFN)."""
        x_TD, w13_ED2H, w2_EHD = self._cast(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return _swiglu(x_TD @ w13_ED2H[0]) @ w2_EHD[0]


def upgrade_state_dict(state_dict: dict) -> dict:
    """Fuse every layer's separate gate/up weights (checkpoints before the fused `w13`), in
    place, so a whole model's saved tensors compare with today's parameters."""
    for key in [k for k in state_dict if k.endswith("w1_EDH")]:
        _fuse_gate_up(None, state_dict, key[: -len("w1_EDH")])
    return state_dict


def _fuse_gate_up(module, state_dict, prefix, *_args) -> None:
    """Load-time conversion of checkpoints with separate gate (w1) and up (w3) weights."""
    w1, w3 = prefix + "w1_EDH", prefix + "w3_EDH"
    if w1 not in state_dict and w3 not in state_dict:
        return
    if w1 not in state_dict or w3 not in state_dict:
        raise BadInput(f"checkpoint has only one of {w1} and {w3}; both are needed to build "
                         f"{prefix}w13_ED2H (re-save it with both, or retrain)")
    state_dict[prefix + "w13_ED2H"] = torch.cat([state_dict.pop(w1), state_dict.pop(w3)], -1)


def init_std_for_output(init_std: float, n_layers: int) -> float:
    """Depth-scaled init of residual-branch output projections (GPT-2 / nanoGPT)."""
    return init_std / math.sqrt(2 * n_layers)

"""SwiGLU experts over a grouped-matmul backend: Dispatch -> Experts -> Combine.

Shape legend: T tokens, D model width, H expert hidden width, E experts,
K experts per token, S = T*K routed token-slots.

Every expert computes SwiGLU(x) = (silu(x W1_e) * (x W3_e)) W2_e with weights
stored as `w1_EDH`, `w3_EDH` (gate, up) and `w2_EHD` (down). Dispatch sorts the
S (token, slot) pairs by expert; a *backend* then computes, for every token,
the router-weighted sum of its experts' outputs. All backends share one
signature, `fn(x_TD, plan, w1_EDH, w3_EDH, w2_EHD) -> y_TD`, so a new kernel
replaces one function:

- `loop`: one matmul per expert; the readable reference.
- `torch`: `torch.nn.functional.grouped_mm` (or `torch._grouped_mm`) on the
  expert-sorted rows; falls back to `loop` where torch's kernel cannot take the
  shapes (row strides must be multiples of 16 bytes).
- `triton`: Triton grouped GEMM that gathers and scatters rows in the kernel
  (`moe.kernels.moe_experts`), CUDA only.
- `megablocks`: MegaBlocks' grouped GEMM (optional, GPU only, lazily imported).
- `auto`: `triton` on CUDA when Triton imports, else `torch` (which itself
  falls back to `loop` where grouped_mm is missing or the shapes do not suit
  it). On CPU, `torch` and `loop` train pocket-tiny at the same speed within
  2% (benchmarks/bench_train.py).

Routing is dropless: every token reaches all of its K experts.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DispatchPlan:
    """The S = T*K routed token-slots, sorted by expert."""

    token_idx_S: torch.Tensor
    """int64 [S]: source token of each expert-sorted slot."""
    weight_S: torch.Tensor
    """[S]: router weight of each sorted slot (differentiable)."""
    offs_E: torch.Tensor
    """int32 [E]: cumulative END offset of each expert's slots (grouped_mm convention)."""
    counts_E: torch.Tensor
    """int64 [E]: slots per expert."""
    slot_order_S: torch.Tensor
    """int64 [S]: position in the flattened [T, K] routing of each sorted slot."""


def make_dispatch_plan(expert_idx_TK: torch.Tensor, weight_TK: torch.Tensor,
                       n_experts: int) -> DispatchPlan:
    """Sort the (token, slot) pairs by expert (stable: token order within an expert)."""
    top_k = expert_idx_TK.shape[1]
    flat_expert_S = expert_idx_TK.reshape(-1)
    slot_order_S = torch.argsort(flat_expert_S, stable=True)
    counts_E = torch.bincount(flat_expert_S, minlength=n_experts)
    return DispatchPlan(
        token_idx_S=slot_order_S // top_k,
        weight_S=weight_TK.reshape(-1)[slot_order_S],
        offs_E=torch.cumsum(counts_E, dim=0).to(torch.int32),
        counts_E=counts_E,
        slot_order_S=slot_order_S,
    )


ExpertFn = Callable[[torch.Tensor, DispatchPlan, torch.Tensor, torch.Tensor, torch.Tensor],
                    torch.Tensor]


def _combine(y_SD: torch.Tensor, plan: DispatchPlan, n_tokens: int) -> torch.Tensor:
    """Weight each slot's output by its router weight and sum back into token order."""
    y_SD = y_SD * plan.weight_S.to(y_SD.dtype).unsqueeze(-1)
    out_TD = y_SD.new_zeros(n_tokens, y_SD.shape[-1])
    return out_TD.index_add(0, plan.token_idx_S, y_SD)


def _gate_up(w1_EDH: torch.Tensor, w3_EDH: torch.Tensor) -> torch.Tensor:
    """[E, D, 2H]: gate and up side by side, so one matmul computes both."""
    return torch.cat([w1_EDH, w3_EDH], dim=-1)


def _swiglu(gate_up_S2H: torch.Tensor) -> torch.Tensor:
    gate_SH, up_SH = gate_up_S2H.chunk(2, dim=-1)
    return F.silu(gate_SH) * up_SH


def loop_experts(x_TD: torch.Tensor, plan: DispatchPlan, w1_EDH: torch.Tensor,
                 w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    """Reference backend: gather the sorted rows, one SwiGLU per expert, combine."""
    x_SD = x_TD[plan.token_idx_S]
    counts = plan.counts_E.tolist()
    w13_ED2H = _gate_up(w1_EDH, w3_EDH)
    outs = []
    for e, rows_SD in enumerate(torch.split(x_SD, counts)):
        if counts[e] == 0:
            continue
        outs.append(_swiglu(rows_SD @ w13_ED2H[e]) @ w2_EHD[e])
    y_SD = torch.cat(outs) if outs else x_SD.new_zeros(0, w2_EHD.shape[-1])
    return _combine(y_SD, plan, x_TD.shape[0])


def _grouped_mm_fn() -> Callable | None:
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def _grouped_mm_ok(x_SD: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch's grouped_mm needs 16-byte-aligned row strides, and bf16 on CUDA (SM >= 80)."""
    if x_SD.is_cuda and x_SD.dtype != torch.bfloat16:
        return False
    size = x_SD.element_size()
    dims = [x_SD.shape[-1]] + [w.shape[-1] for w in weights]
    return all((d * size) % 16 == 0 for d in dims) and x_SD.shape[0] > 0


def torch_experts(x_TD: torch.Tensor, plan: DispatchPlan, w1_EDH: torch.Tensor,
                  w3_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.grouped_mm over the expert-sorted rows (loop where it can't)."""
    gmm = _grouped_mm_fn()
    x_SD = x_TD[plan.token_idx_S]
    if gmm is None or not _grouped_mm_ok(x_SD, w1_EDH, w2_EHD):
        return loop_experts(x_TD, plan, w1_EDH, w3_EDH, w2_EHD)
    dtype = x_SD.dtype  # autocast does not cover grouped_mm: cast the weights ourselves
    w13_ED2H = _gate_up(w1_EDH, w3_EDH).to(dtype)
    h_SH = _swiglu(gmm(x_SD, w13_ED2H, offs=plan.offs_E))
    y_SD = gmm(h_SH, w2_EHD.to(dtype), offs=plan.offs_E)
    return _combine(y_SD, plan, x_TD.shape[0])


# name -> "module:function" for lazily imported backends, so importing this
# module never imports Triton or MegaBlocks.
_LAZY_BACKENDS = {
    "triton": "moe.kernels.moe_experts:triton_experts",
    "megablocks": "moe.kernels.moe_experts:megablocks_experts",
}
_EAGER_BACKENDS: dict[str, ExpertFn] = {"loop": loop_experts, "torch": torch_experts}
BACKENDS = ("auto", *_EAGER_BACKENDS, *_LAZY_BACKENDS)


def get_backend(name: str, device: torch.device | str = "cpu") -> ExpertFn:
    """The expert function for `name`; `auto` picks the fastest available on `device`."""
    if name == "auto":
        name = auto_backend(device)
    if name in _EAGER_BACKENDS:
        return _EAGER_BACKENDS[name]
    if name not in _LAZY_BACKENDS:
        raise ValueError(f"unknown experts backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, fn_name = _LAZY_BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"experts backend {name!r} is unavailable: {exc}") from None
    return getattr(module, fn_name)


def auto_backend(device: torch.device | str) -> str:
    """Fastest backend that runs on `device` (see the module docstring)."""
    return _auto_backend(torch.device(device).type)


@functools.cache
def _auto_backend(device_type: str) -> str:
    if device_type != "cuda":
        return "torch"
    try:
        importlib.import_module("triton")
        importlib.import_module(_LAZY_BACKENDS["triton"].split(":")[0])
        return "triton"
    except ImportError:
        return "torch" if _grouped_mm_fn() is not None else "loop"


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts with weights [E, D, H] / [E, H, D], run by a chosen backend."""

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, *, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown experts backend {backend!r}; choose one of "
                             f"{', '.join(BACKENDS)}")
        self.backend = backend
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w3_EDH = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))

    @property
    def n_experts(self) -> int:
        return self.w1_EDH.shape[0]

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1_EDH, std=std)
        nn.init.normal_(self.w3_EDH, std=std)
        nn.init.normal_(self.w2_EHD, std=out_std)

    def forward(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor,
                weight_TK: torch.Tensor) -> torch.Tensor:
        plan = make_dispatch_plan(expert_idx_TK, weight_TK, self.n_experts)
        fn = get_backend(self.backend, x_TD.device)
        return fn(x_TD, plan, self.w1_EDH, self.w3_EDH, self.w2_EHD)

    def dense_forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The single expert applied to every token with weight 1 (a dense SwiGLU FFN)."""
        w13_D2H = _gate_up(self.w1_EDH[0], self.w3_EDH[0]).to(x_TD.dtype)
        return _swiglu(x_TD @ w13_D2H) @ self.w2_EHD[0].to(x_TD.dtype)


def init_std_for_output(init_std: float, n_layers: int) -> float:
    """Depth-scaled init of residual-branch output projections (GPT-2 / nanoGPT)."""
    return init_std / math.sqrt(2 * n_layers)

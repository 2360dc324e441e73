"""The one precision policy: which tensors are bf16 and which fp32, on every layout.

`train.precision` resolves to bf16 or fp32 (`auto`: bf16 on CUDA, fp32 elsewhere). Under
bf16 the model runs inside `torch.autocast(dtype=bfloat16)`, and in every phase (training,
validation, task scoring, generation) and on every layout (one process, DDP, FSDP2,
FSDP2 x expert parallelism) the same tensors have the same dtype:

- bf16: the operands of the matmuls -- attention projections and attention itself, the
  expert matmuls (cast at the experts' seam, `moe.model.experts`), the LM head;
- fp32: parameters and optimizer states (the master weights), the residual stream (every
  block's input and output), RMSNorm, the router's logits, softmax and weights, the
  expert combine, every loss; gradients are reduced in fp32.

FSDP2 must not change this: its `MixedPrecisionPolicy` gathers only matmul weights in
bf16 (the values autocast would cast them to anyway) and never casts a module's inputs,
so norms, router and residual stream stay fp32 exactly as under DDP
(`moe.train.parallel`). docs/architecture.md, "Precision", says the same.
"""

from __future__ import annotations

import contextlib

import torch

from moe.config.schema import PRECISIONS
from moe.errors import BadConfig


def uses_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether `precision` (a `train.precision` value) means bf16 autocast on `device`."""
    if precision not in PRECISIONS:
        raise BadConfig(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast(precision: str, device: torch.device | str):
    """The context every forward of the run runs in: bf16 autocast, or nothing (fp32)."""
    device = torch.device(device)
    if not uses_bf16(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

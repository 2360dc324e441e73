"""Triton kernels for the MoE experts, each beside a plain-PyTorch reference.

`from moe.kernels import grouped_mm` gives the Triton grouped GEMM with the
`torch.nn.functional.grouped_mm` convention. Attributes are imported on first
use, so `import moe.kernels` alone does not import Triton (and a test can still set
TRITON_INTERPRET=1 before the kernels are defined).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "grouped_mm": "moe.kernels.grouped_gemm",
    "grouped_mm_reference": "moe.kernels.grouped_gemm",
    "gather_scatter_mm": "moe.kernels.grouped_gemm",
    "gather_scatter_mm_reference": "moe.kernels.grouped_gemm",
    "triton_experts": "moe.kernels.moe_experts",
    "megablocks_experts": "moe.kernels.moe_experts",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

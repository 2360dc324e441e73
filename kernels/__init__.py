"""Triton kernels for the MoE experts, each beside a plain-PyTorch reference.

`from kernels import grouped_mm` gives the Triton grouped GEMM with the
`torch.nn.functional.grouped_mm` convention. Attributes are imported on first
use, so `import kernels` alone does not import Triton (and a test can still set
TRITON_INTERPRET=1 before the kernels are defined).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "grouped_mm": "kernels.grouped_gemm",
    "grouped_mm_reference": "kernels.grouped_gemm",
    "gather_scatter_mm": "kernels.grouped_gemm",
    "gather_scatter_mm_reference": "kernels.grouped_gemm",
    "triton_experts": "kernels.moe_experts",
    "megablocks_experts": "kernels.moe_experts",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

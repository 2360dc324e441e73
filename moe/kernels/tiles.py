"""Tile configs of the Triton grouped GEMM and the pruner that picks them per launch.

Hopper (sm90+) and Ampere (sm80/86/89) get their own lists; the pruner keeps the
list of the running GPU. Every one of them is built for sm_80/sm_90 by
`moe kernels compile` (CI), without spills, for what the JIT specialises at the
paper's shapes: 16-byte aligned rows, widths and strides that are multiples of
16 elements. Widths that are not cannot vectorise the row loads (one 64-bit
pointer per element) and spill in the big tiles, so they get UNALIGNED_CONFIGS
only. The interpreter benchmarks nothing (multi-config autotune fails there), so
it gets exactly one config.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


HOPPER_CONFIGS = [
    _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4),
    _cfg(64, 256, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
]
AMPERE_CONFIGS = [
    _cfg(128, 256, 32, 8, 3), _cfg(256, 128, 32, 8, 3), _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 32, 4, 4), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 4),
    _cfg(128, 128, 64, 8, 3),
]
UNALIGNED_CONFIGS = [_cfg(64, 64, 32, 4, 4)]
INTERPRETER_CONFIGS = [_cfg(32, 64, 64, 4, 1)]
GROUP_M = 8  # row tiles that share L2 while sweeping the columns (see _swizzle)
ALIGN = 16  # elements (sizes, strides) and bytes (base pointers), as the JIT specialises


def autotune_configs() -> list[triton.Config]:
    if INTERPRET:
        return INTERPRETER_CONFIGS
    return HOPPER_CONFIGS + AMPERE_CONFIGS + UNALIGNED_CONFIGS


def is_aligned(named_args: dict) -> bool:
    """Whether every size and stride is 1 or a multiple of 16 and every operand 16-byte aligned."""
    for name, value in named_args.items():
        if isinstance(value, torch.Tensor):
            if name in ("a_ptr", "b_ptr", "c_ptr") and value.data_ptr() % ALIGN:
                return False
        elif (name in ("N", "K") or name.startswith("stride_")) and value != 1 \
                and value % ALIGN:
            return False
    return True


def prune_for_device(configs, named_args, **kwargs):
    """Keep the config list of the GPU the kernel is about to run on (and the shapes')."""
    if INTERPRET:
        return configs
    major, _ = torch.cuda.get_device_capability(named_args["a_ptr"].device)
    if not is_aligned(named_args):
        wanted = UNALIGNED_CONFIGS
    else:
        wanted = HOPPER_CONFIGS if major >= 9 else AMPERE_CONFIGS
    return [c for c in configs if any(c is w for w in wanted)]

"""Triton grouped GEMM for MoE experts, with row gather/scatter fused into the loads/stores.

Shape legend: M sorted rows (token-slots grouped by expert), K input width,
N output width, E groups (experts), T tokens.

`grouped_mm(x_TK, w_EKN, offs_E)` follows `torch.nn.functional.grouped_mm`:
rows of `x` are sorted by group and `offs_E` holds int32 cumulative END offsets,
so group e owns rows [offs[e-1], offs[e]) and multiplies them by `w[e]`. Rows
past `offs[-1]` come out as zeros (torch leaves them uninitialised).

`gather_scatter_mm` is the MoE form (ScatterMoE's idea): sorted row s reads
`x[gather_idx_S[s] // fanout]` straight from token order (gather_idx_S: the flat
routing slots, fanout: K), and/or writes its result to row `scatter_idx_S[s]`, so
neither the permuted input nor the un-permuted output is ever materialised as a
copy. Both maps are permutations, so the backward writes every row to its own
slot and reduces the K slots of a token with a reshape-sum: no atomics.

Layers: `_*_kernel` (Triton) -> `launch_*` (checks, raises ValueError) ->
`torch.library.custom_op` (opaque to torch.compile, with fake impls) ->
`_GatherScatterMM` (autograd.Function) -> `grouped_mm` / `gather_scatter_mm`.
`*_reference` functions beside them compute the same in plain PyTorch.

Without CUDA the kernels run only under `TRITON_INTERPRET=1` (set before this
module is imported), with a single small tile config; there the inputs of bf16
dots are upcast to fp32 because the interpreter's bf16 `tl.dot` is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.errors import BadConfig
from moe.kernels.tiles import GROUP_M, INTERPRET, autotune_configs, prune_for_device

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # interpreter + bf16: its bf16 dot returns garbage (triton #11584)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _swizzle(pid, n_pid_m, n_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles sweep all column tiles together, so their
    rows of x stay in L2 instead of being re-read from memory for every column tile."""
    n_in_group = GROUP_M * n_pid_n
    first_m = (pid // n_in_group) * GROUP_M
    group_size = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % n_in_group) % group_size
    pid_n = (pid % n_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _locate_tile(pid_m, offs_ptr, M, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map row-tile program `pid_m` to (expert, first row, row end, is_tail).

    Each group gets cdiv(count_e, BLOCK_M) tiles, so no tile straddles two
    experts. The grid has cdiv(M, BLOCK_M) + E row programs, which always
    covers those tiles plus the rows past offs[-1]; those "tail" programs
    write zeros there so every output row is defined.
    """
    e = tl.arange(0, E_POW2)
    end_e = tl.load(offs_ptr + e, mask=e < E, other=0)
    start_e = tl.load(offs_ptr + e - 1, mask=(e >= 1) & (e < E), other=0)
    tiles_e = tl.where(e < E, tl.cdiv(end_e - start_e, BLOCK_M), 0)
    last_tile_e = tl.cumsum(tiles_e, axis=0)  # tiles of experts 0..e
    expert = tl.sum((last_tile_e <= pid_m).to(tl.int32), axis=0)
    is_tail = expert >= E
    first_tile = tl.sum(tl.where(e == expert, last_tile_e - tiles_e, 0), axis=0)
    group_start = tl.sum(tl.where(e == expert, start_e, 0), axis=0)
    group_end = tl.sum(tl.where(e == expert, end_e, 0), axis=0)
    rows_end = tl.load(offs_ptr + E - 1)
    n_tiles = tl.sum(tiles_e, axis=0)
    row_start = tl.where(is_tail, rows_end + (pid_m - n_tiles) * BLOCK_M,
                         group_start + (pid_m - first_tile) * BLOCK_M)
    row_end = tl.where(is_tail, M, group_end)
    return expert, row_start, row_end, is_tail


@triton.autotune(configs=autotune_configs(), key=["N", "K"],
                 prune_configs_by={"early_config_prune": prune_for_device})
@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, c_ptr, offs_ptr, a_idx_ptr, c_idx_ptr,
    M, N, K, E, FANOUT,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, E_POW2: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[c_idx[s]] = a[a_idx[s] // FANOUT] @ b[e] for every sorted row s of group e."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M) + E,
                            tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end, is_tail = _locate_tile(pid_m, offs_ptr, M, E, E_POW2, BLOCK_M)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if GATHER_A:
        a_rows = tl.load(a_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64) // FANOUT
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    # One 64-bit pointer per row and per column, not per element: a [BLOCK_M, BLOCK_K]
    # tensor of pointers carried through the loop costs 2 registers per element and spills.
    a_row_ptrs = a_ptr + a_rows * stride_am
    b_col_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(is_tail, 0, K)  # tail tiles only store zeros
    for k0 in range(0, k_end, BLOCK_K):
        k_idx = k0 + ks
        k_mask = k_idx < K
        a = tl.load(a_row_ptrs[:, None] + k_idx[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_col_ptrs[None, :] + k_idx[:, None] * stride_bk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    if SCATTER_C:
        c_rows = tl.load(c_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=autotune_configs(), key=["N", "K"],
                 prune_configs_by={"early_config_prune": prune_for_device})
@triton.jit
def _grouped_mm_dw_kernel(
    a_ptr, b_ptr, c_ptr, offs_ptr, a_idx_ptr, b_idx_ptr,
    N, K, FANOUT,
    stride_am, stride_ak, stride_bm, stride_bn, stride_ce, stride_ck, stride_cn,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[e] = a[a_idx[rows_e]]^T @ b[b_idx[rows_e]]: the weight gradient of group e."""
    # Expert-major order: the programs of one group run together and share its rows in L2.
    n_pid_k = tl.cdiv(K, BLOCK_K)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (n_pid_k * n_pid_n)
    pid_k = (pid % (n_pid_k * n_pid_n)) // n_pid_n
    pid_n = pid % n_pid_n
    row_start = tl.load(offs_ptr + tl.maximum(expert - 1, 0))
    row_start = tl.where(expert > 0, row_start, 0)
    row_end = tl.load(offs_ptr + expert)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64) // FANOUT
        else:
            a_rows = rows.to(tl.int64)
        if GATHER_B:
            b_rows = tl.load(b_idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + ks[:, None] * stride_ak,
                      mask=k_mask[:, None] & row_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + cols[None, :] * stride_bn,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a_t, b, acc, PRECISION, UPCAST)
    c_ptrs = (c_ptr + expert.to(tl.int64) * stride_ce
              + ks[:, None] * stride_ck + cols[None, :] * stride_cn)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------
# Launchers: every check a user can trip raises ValueError.
# ---------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 inputs


def _check_device(*tensors: torch.Tensor | None) -> None:
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = present[0].device
    if device.type == "cuda" or device.type == "meta":
        return
    if device.type == "cpu" and INTERPRET:
        return
    raise BadConfig(f"Triton grouped GEMM needs CUDA tensors (got {device}); on CPU set "
                     "TRITON_INTERPRET=1 before importing kernels, or use torch's grouped_mm")


def _check_index(name: str, idx: torch.Tensor | None, n_rows: int | None = None) -> None:
    if idx is None:
        return
    if idx.dim() != 1 or idx.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {idx.dtype} "
                         f"{tuple(idx.shape)}")
    if n_rows is not None and idx.shape[0] != n_rows:
        raise ValueError(f"{name} has {idx.shape[0]} rows, expected {n_rows}")


def _check_operands(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                    a_idx: torch.Tensor | None, c_idx: torch.Tensor | None,
                    fanout: int = 1) -> int:
    """Shape/dtype/device checks shared by the launcher and the fake impl; returns M."""
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"expected x [M, K] and w [E, K, N], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dtype not in DTYPES or b.dtype != a.dtype:
        raise ValueError(f"x and w must share one dtype of {DTYPES}, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dims differ: x has K={a.shape[1]}, w has K={b.shape[1]}")
    if offs.dim() != 1 or offs.dtype != torch.int32 or offs.shape[0] != b.shape[0]:
        raise ValueError(f"offs must be int32 [E={b.shape[0]}], got {offs.dtype} "
                         f"{tuple(offs.shape)}")
    if b.shape[0] == 0:
        raise ValueError("w must have at least one group (E >= 1)")
    if fanout < 1:
        raise ValueError(f"fanout must be >= 1, got {fanout}")
    _check_index("gather_idx", a_idx, None if a_idx is None else a.shape[0] * fanout)
    n_rows = a_idx.shape[0] if a_idx is not None else a.shape[0]
    _check_index("scatter_idx", c_idx, n_rows)
    _check_device(a, b, offs, a_idx, c_idx)
    return n_rows


def check_offsets(offs: torch.Tensor, n_rows: int) -> None:
    """Raise ValueError unless offs is non-decreasing within [0, n_rows] (one host sync)."""
    if offs.numel() == 0:
        return
    first, last = offs[0].item(), offs[-1].item()
    if first < 0 or last > n_rows:
        raise ValueError(f"offs must lie in [0, {n_rows}] (the number of rows), "
                         f"got first={first}, last={last}")
    if offs.numel() > 1 and bool((offs[1:] < offs[:-1]).any()):
        raise ValueError("offs must be non-decreasing (cumulative END offsets per group)")


def _check_permutation(name: str, idx: torch.Tensor | None) -> None:
    if idx is None or idx.numel() == 0:
        return
    n = idx.shape[0]
    in_range = idx.min().item() >= 0 and idx.max().item() < n
    if not in_range or bool((torch.bincount(idx, minlength=n) != 1).any()):
        raise ValueError(f"{name} must be a permutation of range({n})")


def launch_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                      a_idx: torch.Tensor | None = None, c_idx: torch.Tensor | None = None,
                      fanout: int = 1, *, check_values: bool = True) -> torch.Tensor:
    """c [M, N] with c[c_idx[s]] = a[a_idx[s] // fanout] @ b[group(s)]; rows past offs[-1]: 0."""
    n_rows = _check_operands(a, b, offs, a_idx, c_idx, fanout)
    if check_values:
        check_offsets(offs, n_rows)
        _check_permutation("gather_idx", a_idx)
        _check_permutation("scatter_idx", c_idx)
    n_groups, k_dim, n_dim = b.shape
    c = torch.empty(n_rows, n_dim, device=a.device, dtype=a.dtype)
    if n_rows == 0 or n_dim == 0:
        return c
    if k_dim == 0:
        return c.zero_()
    grid = lambda meta: ((triton.cdiv(n_rows, meta["BLOCK_M"]) + n_groups)
                         * triton.cdiv(n_dim, meta["BLOCK_N"]),)
    _grouped_mm_kernel[grid](
        a, b, c, offs, a if a_idx is None else a_idx, c if c_idx is None else c_idx,
        n_rows, n_dim, k_dim, n_groups, fanout,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        GATHER_A=a_idx is not None, SCATTER_C=c_idx is not None,
        E_POW2=max(2, triton.next_power_of_2(n_groups)), PRECISION=_precision(a.dtype),
        UPCAST=INTERPRET and a.dtype == torch.bfloat16, GROUP_M=GROUP_M,
    )
    return c


def launch_grouped_mm_dw(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                         a_idx: torch.Tensor | None = None, b_idx: torch.Tensor | None = None,
                         fanout: int = 1, *, check_values: bool = True) -> torch.Tensor:
    """c [E, K, N]: c[e] = sum over rows s of group e of a[a_idx[s] // fanout]^T b[b_idx[s]]."""
    if a.dim() != 2 or b.dim() != 2 or a.dtype not in DTYPES or b.dtype != a.dtype:
        raise ValueError(f"expected a [M, K] and b [M, N] of one float dtype, got {a.dtype} "
                         f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    if offs.dim() != 1 or offs.dtype != torch.int32 or offs.numel() == 0:
        raise ValueError(f"offs must be a non-empty int32 [E], got {offs.dtype} "
                         f"{tuple(offs.shape)}")
    _check_index("a_idx", a_idx)
    _check_index("b_idx", b_idx)
    n_rows = a_idx.shape[0] if a_idx is not None else a.shape[0]
    if (b_idx.shape[0] if b_idx is not None else b.shape[0]) != n_rows:
        raise ValueError("a and b must name the same number of sorted rows")
    _check_device(a, b, offs, a_idx, b_idx)
    if check_values:
        check_offsets(offs, n_rows)
    n_groups, k_dim, n_dim = offs.shape[0], a.shape[1], b.shape[1]
    if n_rows == 0 or k_dim == 0 or n_dim == 0:
        return torch.zeros(n_groups, k_dim, n_dim, device=a.device, dtype=a.dtype)
    c = torch.empty(n_groups, k_dim, n_dim, device=a.device, dtype=a.dtype)  # all tiles stored
    grid = lambda meta: (n_groups * triton.cdiv(k_dim, meta["BLOCK_K"])
                         * triton.cdiv(n_dim, meta["BLOCK_N"]),)
    _grouped_mm_dw_kernel[grid](
        a, b, c, offs, a if a_idx is None else a_idx, b if b_idx is None else b_idx,
        n_dim, k_dim, fanout, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0), c.stride(1), c.stride(2),
        GATHER_A=a_idx is not None, GATHER_B=b_idx is not None,
        PRECISION=_precision(a.dtype), UPCAST=INTERPRET and a.dtype == torch.bfloat16,
    )
    return c


# ---------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile; the fake impls give shapes)
# ---------------------------------------------------------------------------

@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                   a_idx: torch.Tensor | None, c_idx: torch.Tensor | None, fanout: int,
                   check_values: bool) -> torch.Tensor:
    return launch_grouped_mm(a, b, offs, a_idx, c_idx, fanout, check_values=check_values)


@_grouped_mm_op.register_fake
def _grouped_mm_fake(a, b, offs, a_idx, c_idx, fanout, check_values):
    n_rows = _check_operands(a, b, offs, a_idx, c_idx, fanout)
    return a.new_empty(n_rows, b.shape[2])


@torch.library.custom_op("moe_kernels::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                      a_idx: torch.Tensor | None, b_idx: torch.Tensor | None,
                      fanout: int) -> torch.Tensor:
    return launch_grouped_mm_dw(a, b, offs, a_idx, b_idx, fanout, check_values=False)


@_grouped_mm_dw_op.register_fake
def _grouped_mm_dw_fake(a, b, offs, a_idx, b_idx, fanout):
    return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])


# ---------------------------------------------------------------------------
# Autograd and the public functions
# ---------------------------------------------------------------------------

class _GatherScatterMM(torch.autograd.Function):
    """y[scatter[s]] = x[gather[s] // fanout] @ w[group(s)]; both backward products in Triton.

    The index maps are permutations, so the backward never accumulates rows with
    atomics: dx is written to the [rows * fanout] slot buffer through `gather`
    and summed over the fanout with a reshape (deterministic).
    """

    @staticmethod
    def forward(ctx, x, w, offs, gather_idx, scatter_idx, fanout, check_values):
        ctx.save_for_backward(x, w, offs, gather_idx, scatter_idx)
        ctx.fanout = fanout
        return _grouped_mm_op(x, w, offs, gather_idx, scatter_idx, fanout, check_values)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs, gather_idx, scatter_idx = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dX_s = dY[scatter[s]] @ w_e^T: the forward kernel on w's transposed view,
            # each sorted row written to its slot gather[s].
            dx_slots = _grouped_mm_op(dy, w.transpose(1, 2), offs, scatter_idx, gather_idx,
                                      1, False)
            dx = dx_slots.view(x.shape[0], ctx.fanout, x.shape[1]).sum(1) \
                if gather_idx is not None and ctx.fanout > 1 else dx_slots
        if ctx.needs_input_grad[1]:
            dw = _grouped_mm_dw_op(x, dy, offs, gather_idx, scatter_idx, ctx.fanout)
        return dx, dw, None, None, None, None, None


def gather_scatter_mm(x: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor,
                      gather_idx_S: torch.Tensor | None = None,
                      scatter_idx_S: torch.Tensor | None = None, fanout: int = 1,
                      *, check_values: bool = True) -> torch.Tensor:
    """Grouped GEMM over S sorted rows, reading and writing rows through index maps.

    Sorted row s (group e: offs[e-1] <= s < offs[e]) computes
    x[gather_idx_S[s] // fanout] @ w[e] and stores it at row scatter_idx_S[s] of the
    [S, N] output. `gather_idx_S` is a permutation of range(x.shape[0] * fanout): with
    the MoE routing's flat slots (token t's j-th choice is slot t*fanout + j) it reads
    each token's row once per choice. `scatter_idx_S` is a permutation of range(S).
    Without an index the identity is used. `check_values=False` skips the value
    checks of offsets and indices, which need a host sync on GPU.

    Autocast rule: autocast does not reach inside custom ops, so under autocast x and
    w are cast to the autocast dtype here, before the autograd function saves them
    (the backward then sees operands of one dtype).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, w_EKN = x.to(dtype), w_EKN.to(dtype)
    return _GatherScatterMM.apply(x, w_EKN, offs_E, gather_idx_S, scatter_idx_S, fanout,
                                  check_values)


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`torch.nn.functional.grouped_mm(x, w, offs=offs)` in Triton (rows past offs[-1] are 0)."""
    return gather_scatter_mm(x_TK, w_EKN, offs_E)


def gather_scatter_mm_reference(x: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor,
                                gather_idx_S: torch.Tensor | None = None,
                                scatter_idx_S: torch.Tensor | None = None, fanout: int = 1,
                                *, check_values: bool = True) -> torch.Tensor:
    """Plain-PyTorch `gather_scatter_mm`: one matmul per group."""
    x_SK = x if gather_idx_S is None else x[gather_idx_S // fanout]
    y_SN = grouped_mm_reference(x_SK, w_EKN, offs_E)
    if scatter_idx_S is None:
        return y_SN
    return torch.zeros_like(y_SN).index_copy(0, scatter_idx_S, y_SN)


def grouped_mm_reference(x_TK: torch.Tensor, w_EKN: torch.Tensor,
                         offs_E: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch grouped GEMM: y[rows of group e] = x[rows] @ w[e]; other rows 0."""
    ends = offs_E.tolist()
    starts = [0] + ends[:-1]
    y_TN = x_TK.new_zeros(x_TK.shape[0], w_EKN.shape[2])
    parts = [x_TK[s:e] @ w_EKN[g] for g, (s, e) in enumerate(zip(starts, ends, strict=True))]
    if not parts:
        return y_TN
    return torch.cat([torch.cat(parts), y_TN[ends[-1]:]])

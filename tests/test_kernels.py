"""Triton grouped GEMM: outputs and every gradient against plain-PyTorch references.

Without CUDA the kernels run under Triton's CPU interpreter, which must be on
before any kernel is defined, hence the environment line above the imports.
Shapes stay small because interpreter time grows with the number of programs.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe.kernels import (  # noqa: E402
    gather_scatter_mm,
    gather_scatter_mm_reference,
    grouped_mm,
    grouped_mm_reference,
)
from moe.kernels import grouped_gemm as gg  # noqa: E402
from moe.kernels.moe_experts import (  # noqa: E402
    BackendUnavailableError,
    megablocks_experts,
    triton_experts,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not gg.INTERPRET:
    pytest.fail("kernels.grouped_gemm was imported before TRITON_INTERPRET=1 was set; "
                "set it at the top of tests/conftest.py", pytrace=False)
TOL = {
    torch.float32: dict(atol=1e-3, rtol=1e-3),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (rows T, K, N, rows per group): empty groups, T=1, E=1, K and N not multiples
# of the 64-wide tiles, rows past the last offset (left zero).
RAGGED = {
    "empty-groups": (70, 72, 80, [0, 23, 0, 41, 6, 0]),
    "single-row": (1, 24, 40, [0, 1, 0]),
    "one-group": (37, 65, 33, [37]),
    "rows-past-end": (50, 16, 20, [10, 0, 25]),
    "no-rows": (0, 8, 12, [0, 0]),
}


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)


def _leaf(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()


def _grads(fn, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, dy)]


def _assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], dtype) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype], msg=f"tensor {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(RAGGED))
def test_grouped_mm_matches_reference(case, dtype):
    torch.manual_seed(0)
    n_rows, k_dim, n_dim, counts = RAGGED[case]
    x = _leaf(n_rows, k_dim, dtype=dtype)
    w = _leaf(len(counts), k_dim, n_dim, dtype=dtype, scale=k_dim ** -0.5)
    offs = _offsets(counts)
    dy = torch.randn(n_rows, n_dim, device=DEVICE).to(dtype)
    got = _grads(lambda a, b: grouped_mm(a, b, offs), [x, w], dy)
    # The reference runs in fp32 on the same (rounded) inputs.
    x32, w32 = (t.detach().float().requires_grad_() for t in (x, w))
    want = _grads(lambda a, b: grouped_mm_reference(a, b, offs), [x32, w32], dy.float())
    _assert_all_close(got, want, dtype)
    assert not got[0][offs[-1]:].any(), "rows past offs[-1] must be zero"


def test_grouped_mm_matches_torch_grouped_mm():
    torch.manual_seed(1)
    counts = [9, 0, 30, 1, 0, 20]  # torch wants 16-byte rows: K, N multiples of 4 in fp32
    x = _leaf(sum(counts), 68, dtype=torch.float32)
    w = _leaf(len(counts), 68, 84, dtype=torch.float32, scale=68 ** -0.5)
    offs = _offsets(counts)
    dy = torch.randn(x.shape[0], 84, device=DEVICE)
    got = _grads(lambda a, b: grouped_mm(a, b, offs), [x, w], dy)
    want = _grads(lambda a, b: F.grouped_mm(a, b, offs=offs), [x, w], dy)
    _assert_all_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_scatter_mm_matches_reference(dtype):
    """k=3 routing: rows read through the flat slots (fanout k), written to [T, K] order."""
    torch.manual_seed(2)
    n_tokens, top_k, n_experts, k_dim, n_dim = 29, 3, 5, 40, 70
    expert_TK = torch.randint(0, n_experts - 1, (n_tokens, top_k), device=DEVICE)  # last: empty
    slot_order_S = torch.argsort(expert_TK.reshape(-1), stable=True)
    token_idx_S = slot_order_S // top_k
    offs = torch.bincount(expert_TK.reshape(-1), minlength=n_experts).cumsum(0).to(torch.int32)
    x = _leaf(n_tokens, k_dim, dtype=dtype)
    w = _leaf(n_experts, k_dim, n_dim, dtype=dtype, scale=k_dim ** -0.5)
    dy = torch.randn(n_tokens * top_k, n_dim, device=DEVICE).to(dtype)
    for gather, scatter in [(slot_order_S, None), (None, slot_order_S),
                            (slot_order_S, slot_order_S)]:
        x_in = x if gather is not None else x[token_idx_S].detach().requires_grad_()
        got = _grads(lambda a, b, g=gather, s=scatter: gather_scatter_mm(
            a, b, offs, g, s, top_k), [x_in, w], dy)
        x32, w32 = (t.detach().float().requires_grad_() for t in (x_in, w))
        want = _grads(lambda a, b, g=gather, s=scatter: gather_scatter_mm_reference(
            a, b, offs, g, s, top_k), [x32, w32], dy.float())
        _assert_all_close(got, want, dtype)


def _expert_layer_inputs(n_tokens, d_model, d_hidden, n_experts, top_k, dtype, seed):
    moe_experts = pytest.importorskip("moe.model.experts")
    torch.manual_seed(seed)
    logits_TE = torch.randn(n_tokens, n_experts, device=DEVICE)
    logits_TE[:, -1] = -1e9  # the last expert gets no tokens
    top_TK = logits_TE.topk(top_k, dim=-1)
    weight_TK = top_TK.values.softmax(-1).requires_grad_()
    x = _leaf(n_tokens, d_model, dtype=dtype)
    ws = [_leaf(n_experts, d_model, 2 * d_hidden, dtype=dtype, scale=d_model ** -0.5),
          _leaf(n_experts, d_hidden, d_model, dtype=dtype, scale=d_hidden ** -0.5)]
    return moe_experts, top_TK.indices, weight_TK, x, ws


@pytest.mark.parametrize("n_tokens,top_k,n_experts", [(37, 3, 6), (1, 2, 4), (16, 1, 1)])
def test_triton_experts_equal_loop_backend(n_tokens, top_k, n_experts):
    """The full SwiGLU expert layer: output and the gradients of x, w13, w2, router weights."""
    moe_experts, expert_TK, weight_TK, x, ws = _expert_layer_inputs(
        n_tokens, 24, 48, n_experts, min(top_k, n_experts), torch.float32, seed=3)
    if n_experts == 1:
        weight_TK = torch.ones_like(weight_TK).requires_grad_()
    dy = torch.randn(n_tokens, 24, device=DEVICE)

    def layer(fn):
        def run(x_TD, w_TK, w13, w2):
            plan = moe_experts.make_dispatch_plan(expert_TK, w_TK, n_experts)
            return moe_experts.combine(fn(x_TD, plan, w13, w2), plan.weight_TK)
        return run

    inputs = [x, weight_TK, *ws]
    got = _grads(layer(triton_experts), inputs, dy)
    want = _grads(layer(moe_experts.loop_experts), inputs, dy)
    _assert_all_close(got, want, torch.float32)


def test_grouped_mm_compiles_without_graph_break():
    torch.manual_seed(4)
    counts = [5, 0, 11]
    x = _leaf(16, 24, dtype=torch.float32)
    w = _leaf(3, 24, 40, dtype=torch.float32)
    offs = _offsets(counts)
    compiled = torch.compile(lambda a, b: grouped_mm(a, b, offs).square().sum(),
                             backend="aot_eager", fullgraph=True)
    got = compiled(x, w)
    got.backward()
    want = grouped_mm_reference(x.detach(), w.detach(), offs).square().sum()
    torch.testing.assert_close(got.detach(), want, **TOL[torch.float32])
    assert x.grad is not None and w.grad is not None


def _bad_calls():
    x = torch.randn(10, 8, device=DEVICE)
    w = torch.randn(2, 8, 6, device=DEVICE)
    offs = _offsets([4, 6])
    idx = torch.arange(10, device=DEVICE)
    return {
        "x not 2-D": lambda: grouped_mm(x[None], w, offs),
        "inner dims differ": lambda: grouped_mm(x, w[:, :7], offs),
        "mixed dtypes": lambda: grouped_mm(x, w.half(), offs),
        "integer dtype": lambda: grouped_mm(x.long(), w.long(), offs),
        "offs int64": lambda: grouped_mm(x, w, offs.long()),
        "offs wrong length": lambda: grouped_mm(x, w, offs[:1]),
        "offs decreasing": lambda: grouped_mm(x, w, _offsets([6, -2])),
        "offs past the rows": lambda: grouped_mm(x, w, _offsets([4, 7])),
        "offs negative": lambda: grouped_mm(x, w, torch.tensor([-1, 10], dtype=torch.int32,
                                                               device=DEVICE)),
        "no groups": lambda: grouped_mm(x, w[:0], offs[:0]),
        "devices differ": lambda: grouped_mm(x, w.to("meta"), offs),
        "gather out of range": lambda: gather_scatter_mm(x, w, offs, idx + 1),
        "gather not a permutation": lambda: gather_scatter_mm(x, w, offs, idx // 2),
        "gather wrong length for fanout": lambda: gather_scatter_mm(x, w, offs, idx, None, 2),
        "fanout zero": lambda: gather_scatter_mm(x, w, offs, idx, None, 0),
        "scatter not a permutation": lambda: gather_scatter_mm(x, w, offs, None, idx // 2),
        "scatter wrong length": lambda: gather_scatter_mm(x, w, offs, None, idx[:9]),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_launcher_rejects_bad_input(name):
    with pytest.raises(ValueError):
        _bad_calls()[name]()


def test_launcher_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(gg, "INTERPRET", False)
    x, w = torch.randn(4, 8), torch.randn(1, 8, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gg.launch_grouped_mm(x, w, torch.tensor([4], dtype=torch.int32))


def test_megablocks_backend_explains_what_is_missing():
    if torch.cuda.is_available() and importlib.util.find_spec("megablocks") is not None:
        pytest.skip("megablocks is installed: nothing is missing")
    with pytest.raises(BackendUnavailableError, match="pip install megablocks"):
        megablocks_experts(torch.randn(2, 4, device=DEVICE), None, *[torch.randn(1, 4, 4)] * 2)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", ["empty-groups", "single-row", "one-group"])
def test_grouped_mm_bf16_on_gpu(case):
    test_grouped_mm_matches_reference(case, torch.bfloat16)


@gpu
@needs_cuda
def test_triton_experts_bf16_equal_loop_on_gpu():
    moe_experts, expert_TK, weight_TK, x, ws = _expert_layer_inputs(
        300, 128, 256, 8, 2, torch.bfloat16, seed=5)
    plan = moe_experts.make_dispatch_plan(expert_TK, weight_TK, 8)
    dy = torch.randn(300 * 2, 128, device=DEVICE, dtype=torch.bfloat16)
    got = _grads(lambda *t: triton_experts(t[0], plan, *t[1:]), [x, *ws], dy)
    want = _grads(lambda *t: moe_experts.loop_experts(t[0], plan, *t[1:]), [x, *ws], dy)
    _assert_all_close(got, want, torch.bfloat16)


def test_gather_scatter_mm_autocast_rule():
    """Autocast does not reach custom ops: the op casts its float operands itself."""
    torch.manual_seed(6)
    x = _leaf(12, 16, dtype=torch.float32)
    w = _leaf(2, 16, 32, dtype=torch.float32)
    offs = _offsets([5, 7])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = grouped_mm(x, w, offs)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    want = grouped_mm_reference(x.detach().bfloat16().float(), w.detach().bfloat16().float(),
                                offs)
    torch.testing.assert_close(y.float(), want, **TOL[torch.bfloat16])

"""The GPU path, checked on CPU: an oracle from the definition for every backend, precision
under autocast, a router that learns at k=1, deterministic combine, torch.compile, old
checkpoints. (`triton` runs under TRITON_INTERPRET=1, which tests/conftest.py sets.)
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moe.config import ModelConfig
from moe.model import MoELM
from moe.model.experts import SwiGLUExperts
from moe.model.router import TopKRouter

BACKENDS = ("loop", "torch", "triton")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4)}


def oracle_experts(x_TD, expert_idx_TK, weight_TK, w13_ED2H, w2_EHD):
    """The definition: per token, per chosen expert, SwiGLU times the weight, summed."""
    d_hidden = w2_EHD.shape[1]
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for j in range(expert_idx_TK.shape[1]):
            e = int(expert_idx_TK[t, j])
            gate_H = x_TD[t] @ w13_ED2H[e][:, :d_hidden]
            up_H = x_TD[t] @ w13_ED2H[e][:, d_hidden:]
            y_D = y_D + weight_TK[t, j] * ((F.silu(gate_H) * up_H) @ w2_EHD[e])
        rows.append(y_D)
    return torch.stack(rows)


def _routing(n_tokens, n_experts, top_k, *, empty_expert: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    usable = n_experts - 1 if empty_expert else n_experts
    idx_TK = torch.stack([torch.randperm(usable, generator=g)[:top_k] for _ in range(n_tokens)])
    weight_TK = torch.rand(n_tokens, top_k, generator=g) + 0.1
    return idx_TK, weight_TK


# (T, D, H, E, k, last expert empty): empty experts, T=1, k=E, an odd width (loop fallback).
CASES = {
    "empty-experts": (13, 8, 12, 5, 2, True),
    "one-token": (1, 8, 12, 4, 2, False),
    "k-equals-E": (6, 8, 12, 3, 3, False),
    "odd-width": (7, 6, 10, 4, 3, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_matches_the_oracle_with_all_gradients(backend, case):
    n_tokens, d_model, d_hidden, n_experts, top_k, empty = CASES[case]
    idx_TK, weight_TK = _routing(n_tokens, n_experts, top_k, empty_expert=empty, seed=1)
    experts = SwiGLUExperts(d_model, d_hidden, n_experts, backend=backend)
    experts.reset_parameters(0.3, 0.3)
    x_TD = torch.randn(n_tokens, d_model, generator=torch.Generator().manual_seed(2))
    dy_TD = torch.randn(n_tokens, d_model, generator=torch.Generator().manual_seed(3))

    def run(fn):
        x = x_TD.clone().requires_grad_()
        w = weight_TK.clone().requires_grad_()
        experts.zero_grad()
        y = fn(x, w)
        y.backward(dy_TD)
        return [y.detach(), x.grad, w.grad, experts.w13_ED2H.grad.clone(),
                experts.w2_EHD.grad.clone()]

    got = run(lambda x, w: experts(x, idx_TK, w))
    want = run(lambda x, w: oracle_experts(x, idx_TK, w, experts.w13_ED2H, experts.w2_EHD))
    for name, g, w in zip(["y", "dx", "dweight", "dw13", "dw2"], got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=f"{backend} {case} {name}")
    if empty:
        assert got[3][n_experts - 1].abs().sum() == 0 and got[4][n_experts - 1].abs().sum() == 0


# ---------------------------------------------------------------------------
# Precision under autocast
# ---------------------------------------------------------------------------

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "_grouped_mm", "torch_grouped_mm", "grouped_mm",
           "grouped_mm_dw", "torch_grouped_mm_dw"}


class MatmulDtypes(TorchDispatchMode):
    """Records (op name, input dtypes, output shape) of every matmul that is dispatched."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name in MATMULS:
            dtypes = {a.dtype for a in args
                      if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.calls.append((name, dtypes, tuple(out.shape)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_runs_every_matmul_in_bf16_but_the_router(backend):
    n_experts = 5  # a width no other matmul has: the router's output
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_experts=n_experts, top_k=2,
                      seq_len=8, vocab_size=40, experts_backend=backend)
    model = MoELM(cfg)
    idx = torch.randint(0, 40, (2, 8))
    with MatmulDtypes() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, idx)
    fp32 = [c for c in rec.calls if c[1] != {torch.bfloat16}]
    assert [c[2][-1] for c in fp32] == [n_experts] * cfg.n_layers, fp32  # the routers only
    assert all(c[1] == {torch.float32} for c in fp32)
    # torch: the aten kernel (eager mode calls it without the custom op's dispatch)
    expert_ops = {"loop": "mm", "torch": "_grouped_mm", "triton": "grouped_mm"}[backend]
    assert any(c[0] == expert_ops and c[1] == {torch.bfloat16} for c in rec.calls)
    assert out.ce_loss.dtype == torch.float32 and torch.isfinite(out.ce_loss)


def test_router_and_combine_stay_fp32_under_autocast():
    experts = SwiGLUExperts(8, 12, 4, backend="torch")
    experts.reset_parameters(0.3, 0.3)
    router = TopKRouter(8, 4, 2)
    torch.nn.init.normal_(router.weight_ED)
    x = torch.randn(10, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = router(x)
        y = experts(x, routed.expert_idx_TK, routed.weight_TK)
        dense = experts.dense_forward(x)
    assert routed.weight_TK.dtype == torch.float32 and y.dtype == torch.float32
    assert dense.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# The router learns from the language-model loss, also at k=1
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gets_a_gradient_from_the_lm_loss_alone(top_k):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=top_k,
                      seq_len=8, vocab_size=40)
    model = MoELM(cfg)
    idx = torch.randint(0, 40, (4, 8))
    model(idx, idx).ce_loss.backward()
    grad = model.blocks[0].ffn.router.weight_ED.grad
    assert grad.abs().max() > 1e-6  # measured 9e-5; k=1 renormalised to weight 1 gave ~1e-9


def test_k1_weight_is_the_router_probability():
    router = TopKRouter(8, 4, 1, normalize=True)
    torch.nn.init.normal_(router.weight_ED)
    x = torch.randn(6, 8)
    probs = torch.softmax(x @ router.weight_ED.T, dim=-1)
    torch.testing.assert_close(router(x).weight_TK[:, 0], probs.max(-1).values)
    assert (router(x).weight_TK < 1).all()


# ---------------------------------------------------------------------------
# Deterministic combine
# ---------------------------------------------------------------------------

ACCUMULATING_OPS = {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put",
                    "index_put_", "_index_put_impl_", "scatter_reduce", "scatter_reduce_",
                    "_unsafe_index_put"}


class FloatAccumulations(TorchDispatchMode):
    """Records ops that accumulate float rows by index (atomics on CUDA)."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in ACCUMULATING_OPS and args[0].is_floating_point():
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


def _expert_pass(backend, seed=0, *, device="cpu", dtype=torch.float32, n_tokens=33):
    idx_TK, weight_TK = _routing(n_tokens, 6, 3, empty_expert=True, seed=seed)
    torch.manual_seed(seed)
    experts = SwiGLUExperts(16, 24, 6, backend=backend).to(device)
    experts.reset_parameters(0.3, 0.3)
    x = torch.randn(n_tokens, 16, device=device, requires_grad=True)
    w = weight_TK.to(device).requires_grad_()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        y = experts(x, idx_TK.to(device), w)
    dy = torch.randn(n_tokens, 16, generator=torch.Generator().manual_seed(seed))
    y.backward(dy.to(device))
    return [y.detach(), x.grad, w.grad, experts.w13_ED2H.grad, experts.w2_EHD.grad]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_passes_are_bitwise_equal_and_accumulate_no_float_rows(backend):
    with FloatAccumulations() as rec:
        first = _expert_pass(backend)
    assert rec.hits == [], f"{backend} accumulates float rows by index: {rec.hits}"
    second = _expert_pass(backend)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# torch.compile, and checkpoints from before the fused weight
# ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend,compiler", [("torch", "inductor"), ("triton", "aot_eager")])
def test_whole_model_compiles_fullgraph_and_matches_eager(backend, compiler):
    """No graph break in forward or backward (fullgraph), same loss and gradients as eager.

    `triton` runs the interpreter here, so its graph is checked with aot_eager only.
    """
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4, top_k=2, seq_len=8,
                      vocab_size=40, experts_backend=backend)
    eager = MoELM(cfg)
    compiled_model = MoELM(cfg)
    compiled_model.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 40, (2, 8))
    targets = idx.clone()
    targets[0, :3] = -100  # padding: the router losses use a mask, not boolean indexing
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)

    def loss_and_grads(fn, model):
        out = fn(idx, targets)
        loss = out.ce_loss + 0.01 * out.lb_loss + 0.001 * out.z_loss
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    want = loss_and_grads(eager, eager)
    got = loss_and_grads(compiled, compiled_model)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_old_checkpoint_with_separate_gate_and_up_loads():
    experts = SwiGLUExperts(8, 12, 3)
    w1, w3, w2 = torch.randn(3, 8, 12), torch.randn(3, 8, 12), torch.randn(3, 12, 8)
    experts.load_state_dict({"w1_EDH": w1, "w3_EDH": w3, "w2_EHD": w2})
    torch.testing.assert_close(experts.w13_ED2H.data, torch.cat([w1, w3], dim=-1))
    x = torch.randn(5, 8)
    torch.testing.assert_close(experts.dense_forward(x), (F.silu(x @ w1[0]) * (x @ w3[0])) @ w2[0])
    with pytest.raises(ValueError, match="only one of w1_EDH and w3_EDH"):
        experts.load_state_dict({"w1_EDH": w1, "w2_EHD": w2})


# ---------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these)
# ---------------------------------------------------------------------------

gpu = pytest.mark.gpu
GPU_BACKENDS = ("torch", "triton")


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_on_gpu_matches_the_oracle(backend):
    n_tokens, d_model, d_hidden, n_experts, top_k = 300, 64, 128, 8, 2
    idx_TK, weight_TK = _routing(n_tokens, n_experts, top_k, empty_expert=True, seed=4)
    experts = SwiGLUExperts(d_model, d_hidden, n_experts, backend=backend).cuda()
    experts.reset_parameters(d_model ** -0.5, d_hidden ** -0.5)
    x = torch.randn(n_tokens, d_model, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = experts(x, idx_TK.cuda(), weight_TK.cuda())
    want = oracle_experts(x.bfloat16().float(), idx_TK, weight_TK.cuda(),
                          experts.w13_ED2H.bfloat16().float(), experts.w2_EHD.bfloat16().float())
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_passes_are_bitwise_equal(backend):
    first = _expert_pass(backend, device="cuda", dtype=torch.bfloat16, n_tokens=4096)
    second = _expert_pass(backend, device="cuda", dtype=torch.bfloat16, n_tokens=4096)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_in_the_moe_layer_forward(backend):
    cfg = ModelConfig(d_model=64, n_layers=1, n_heads=2, n_experts=8, top_k=2, seq_len=64,
                      vocab_size=100, experts_backend=backend)
    ffn = MoELM(cfg).cuda().blocks[0].ffn
    x = torch.randn(4, 64, 64, device="cuda")
    mask = torch.ones(4 * 64, dtype=torch.bool, device="cuda")
    _runs_without_host_sync(lambda: ffn(x, mask))


def _runs_without_host_sync(fn) -> None:
    """fn() under bf16 autocast, its second call with CUDA's sync debug mode raising."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fn()  # warm-up: Triton's autotuning synchronises, once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_in_the_model_forward_and_the_step_balance_loss(backend):
    from moe.model.lm import IGNORE_INDEX
    from moe.train.balance import routing_counts, step_balance_term

    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, n_experts=8, top_k=2, seq_len=64,
                      vocab_size=100, experts_backend=backend)
    model = MoELM(cfg).cuda()
    idx = torch.randint(0, 100, (4, 64), device="cuda")
    tgt = idx.clone()
    tgt[0, :7] = IGNORE_INDEX  # padding: a router mask that is not all-true

    def micro_step():
        out = model(idx, tgt)
        lb = step_balance_term(out, routing_counts(out), cfg.top_k, n_parts=1)
        return out.ce_loss + 1e-2 * lb + 1e-3 * out.z_loss

    _runs_without_host_sync(micro_step)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_autocast_on_gpu_runs_the_experts_in_bf16(backend):
    cfg = ModelConfig(d_model=64, n_layers=1, n_heads=2, n_experts=5, top_k=2, seq_len=16,
                      vocab_size=40, experts_backend=backend)
    model = MoELM(cfg).cuda()
    idx = torch.randint(0, 40, (2, 16), device="cuda")
    with MatmulDtypes() as rec, torch.autocast("cuda", dtype=torch.bfloat16):
        model(idx, idx)
    fp32 = [c for c in rec.calls if c[1] != {torch.bfloat16}]
    assert [c[2][-1] for c in fp32] == [5], fp32  # the router only
    expert_op = {"torch": "torch_grouped_mm", "triton": "grouped_mm"}[backend]
    assert any(c[0] == expert_op for c in rec.calls), "fell back from the grouped matmul"


@gpu
def test_model_compiles_with_inductor_on_gpu():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=1, n_heads=2, n_experts=4, top_k=2, seq_len=32,
                      vocab_size=64, experts_backend="triton")
    model = MoELM(cfg).cuda()
    idx = torch.randint(0, 64, (2, 32), device="cuda")
    want = model(idx, idx).ce_loss
    got = torch.compile(model, fullgraph=True)(idx, idx).ce_loss
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_old_model_checkpoint_loads_strictly_into_the_fused_layout():
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_experts=3, top_k=2, seq_len=8,
                      vocab_size=40)
    model = MoELM(cfg)
    old = {}
    for key, value in model.state_dict().items():
        if key.endswith("w13_ED2H"):  # what version 0.1 wrote
            w1, w3 = value.chunk(2, dim=-1)
            old[key.replace("w13_ED2H", "w1_EDH")] = w1.clone()
            old[key.replace("w13_ED2H", "w3_EDH")] = w3.clone()
        else:
            old[key] = value
    fresh = MoELM(cfg)
    fresh.load_state_dict(old)  # strict
    idx = torch.randint(0, 40, (2, 8))
    torch.testing.assert_close(fresh(idx).logits_BTV, model(idx).logits_BTV)


def test_the_backends_implemented_are_the_config_s_names():
    """One list of backend names (moe.config.EXPERT_BACKENDS): the registry implements each
    of them and nothing else."""
    from moe.config import EXPERT_BACKENDS
    from moe.model import experts

    implemented = {"auto", *experts._EAGER_BACKENDS, *experts._LAZY_BACKENDS}
    assert implemented == set(EXPERT_BACKENDS) and experts.BACKENDS == EXPERT_BACKENDS


def test_eager_grouped_mm_equals_the_compilable_custom_op_bitwise():
    """Eager mode skips the custom op's dispatch (`_EagerGroupedMM`); torch.compile traces the
    custom op. Same kernels, same arguments: outputs and both gradients must be identical,
    an empty group included."""
    from moe.kernels import torch_grouped

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 16, generator=gen)
    b = torch.randn(4, 16, 24, generator=gen)
    offs = torch.tensor([9, 9, 30, 37], dtype=torch.int32)  # group 1 is empty
    dy = torch.randn(37, 24, generator=gen)
    results = []
    for fn in (torch_grouped._EagerGroupedMM.apply, torch_grouped._torch_grouped_mm):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(a_, b_, offs)
        y.backward(dy)
        results.append((y.detach(), a_.grad, b_.grad))
    for eager, custom in zip(*results, strict=True):
        assert torch.equal(eager, custom)
    bounds = zip([0, 9, 9, 30], offs.tolist(), strict=True)
    loop = torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(bounds)])
    assert torch.allclose(results[0][0], loop, atol=1e-5)  # and both are the grouped product
    assert torch.equal(results[0][2][1], torch.zeros(16, 24))


@pytest.mark.parametrize("rows, hidden", [(0, 8), (37, 24), (2048, 64), (0, 128), (300, 96),
                                          (2048, 128), (4096, 128), (8192, 96), (5300, 100)])
def test_swiglu_backward_without_concatenation_is_bitwise_autograds(rows, hidden):
    """`_SwiGLU` writes d gate and d up into one buffer instead of autograd's chunk-backward
    concatenation, reading the gate through its half-row view or a contiguous copy (which
    training takes on CPU from H = 96, a multiple of 16, and 2^20 elements): output and
    gradient must be bitwise those of the op-by-op form on every path training takes (the
    copy at widths it would not take: within float rounding), and equal the closed form
    d gate = d h * up * s (1 + g (1 - s)), d up = d h * g s (s = sigmoid(g))."""
    from moe.model.experts import _gate_copied, _SwiGLU, swiglu_reference

    copied = (rows, hidden) in {(4096, 128), (8192, 96)}  # the rule's two sides at each width
    assert _gate_copied(torch.empty(rows, 2 * hidden)) == copied

    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * hidden, generator=gen)
    dh = torch.randn(rows, hidden, generator=gen)
    want_x = gate_up.clone().requires_grad_()
    want = swiglu_reference(want_x)
    want.backward(dh)
    g, u = gate_up.double().chunk(2, dim=-1)
    s = torch.sigmoid(g)
    closed = torch.cat([dh * u * s * (1 + g * (1 - s)), dh * g * s], dim=-1)
    for copy_gate in (False, True):
        got_x = gate_up.clone().requires_grad_()
        got = _SwiGLU.apply(got_x, copy_gate)
        got.backward(dh)
        if copy_gate and hidden % 16:  # a copy training never makes: a row's tail differs
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(got_x.grad, want_x.grad, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(got, want)
            assert torch.equal(got_x.grad, want_x.grad)
        torch.testing.assert_close(got_x.grad.double(), closed, atol=1e-5, rtol=1e-5)

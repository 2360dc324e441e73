"""The MoE model's semantics: shapes, dense equivalence, backends, auxiliary losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.model import MoELM
from moe.model.experts import (
    SwiGLUExperts,
    combine,
    loop_experts,
    make_dispatch_plan,
    torch_experts,
)
from moe.model.router import TopKRouter, load_balance_loss, top_k_choices, z_loss

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}


def test_forward_shapes_and_losses():
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_experts=4, top_k=2, seq_len=16,
                      vocab_size=50)
    model = MoELM(cfg)
    idx = torch.randint(0, 50, (3, 16))
    out = model(idx, idx)
    assert out.logits_BTV.shape == (3, 16, 50)
    assert out.ce_loss.ndim == 0 and math.isfinite(out.ce_loss.item())
    assert len(out.routing) == 3
    assert int(out.routing[0].tokens_per_expert_E.sum()) == 3 * 16 * 2  # dropless: T*k slots
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_single_expert_equals_dense_swiglu():
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_experts=1, top_k=1, seq_len=8,
                      vocab_size=30)
    ffn = MoELM(cfg).blocks[0].ffn
    assert ffn.router is None  # a dense FFN has no router parameters
    x = torch.randn(2, 8, 16)
    w1, w3 = ffn.experts.w13_ED2H[0].chunk(2, dim=-1)
    w2 = ffn.experts.w2_EHD[0]
    dense = (F.silu(x @ w1) * (x @ w3)) @ w2
    y, routed = ffn(x, None)
    assert routed is None
    torch.testing.assert_close(y, dense, **TOL[torch.float32])
    # and the routed path with E=1, k=1 (weight 1 for every token) agrees too
    idx = torch.zeros(16, 1, dtype=torch.long)
    y_routed = ffn.experts(x.reshape(16, 16), idx, torch.ones(16, 1))
    torch.testing.assert_close(y_routed.view(2, 8, 16), dense, **TOL[torch.float32])


def _ragged_routing(T, E, k, seed=0):
    """Routing where expert E-1 gets no token and expert 0 gets exactly one slot."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E - 2, generator=g)[:k] + 1 for _ in range(T)])
    idx[0, 0] = 0
    w = torch.rand(T, k, generator=g)
    return idx, w


@pytest.mark.parametrize("T,D,H,E,k", [(37, 16, 24, 6, 3), (1, 8, 16, 4, 1), (64, 32, 64, 8, 2)])
def test_backends_agree_on_outputs_and_all_gradients(T, D, H, E, k):
    if T == 1:
        idx, w = torch.tensor([[2]]), torch.rand(1, 1)
    else:
        idx, w = _ragged_routing(T, E, k)
    experts = SwiGLUExperts(D, H, E)
    experts.reset_parameters(0.2, 0.2)
    x = torch.randn(T, D)
    grads = {}
    for fn in (loop_experts, torch_experts):
        xs = x.clone().requires_grad_(True)
        ws = w.clone().requires_grad_(True)
        experts.zero_grad()
        plan = make_dispatch_plan(idx, ws, E)
        y = combine(fn(xs, plan, experts.w13_ED2H, experts.w2_EHD), plan.weight_TK)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[fn.__name__] = [y.detach(), xs.grad, ws.grad] + [
            p.grad.clone() for p in (experts.w13_ED2H, experts.w2_EHD)]
    for a, b in zip(grads["loop_experts"], grads["torch_experts"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if T > 1:
        assert grads["loop_experts"][3][E - 1].abs().sum() == 0  # the empty expert gets no grad


def test_load_balance_loss_hand_value_and_uniform():
    # 4 tokens, E=2, k=1: tokens 0,1,2 -> expert 0, token 3 -> expert 1
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    f = torch.tensor([0.75, 0.25])
    p = probs.mean(0)
    expected = 2 * (f * p).sum()
    torch.testing.assert_close(load_balance_loss(probs, idx), expected)
    # a padding token is left out
    mask = torch.tensor([True, True, True, False])
    f3, p3 = torch.tensor([1.0, 0.0]), probs[:3].mean(0)
    torch.testing.assert_close(load_balance_loss(probs, idx, mask), 2 * (f3 * p3).sum())
    # perfectly uniform routing gives exactly 1
    E = 8  # two experts per token: each token picks i and i+1
    uniform = torch.full((E, E), 1.0 / E)
    idx_u = torch.stack([torch.tensor([i, (i + 1) % E]) for i in range(E)])
    assert load_balance_loss(uniform, idx_u).item() == pytest.approx(1.0, abs=1e-6)


def test_z_loss_formula_and_router_gradient():
    router = TopKRouter(8, 4, 2)
    torch.nn.init.normal_(router.weight_ED, std=0.5)
    x = torch.randn(10, 8)
    out = router(x)
    logits = x @ router.weight_ED.T
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    torch.testing.assert_close(z_loss(logits), out.z_loss)
    out.lb_loss.backward()
    assert router.weight_ED.grad is not None and router.weight_ED.grad.abs().sum() > 0
    assert torch.allclose(out.weight_TK.sum(-1), torch.ones(10))  # Mixtral renormalisation (k>1)
    raw = TopKRouter(8, 4, 2, normalize=False)
    raw.weight_ED.data.copy_(router.weight_ED.data)
    assert (raw(x).weight_TK.sum(-1) < 1).all()  # OLMoE keeps raw probabilities


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_takes_its_most_probable_experts_first_index_on_ties(top_k):
    """Against a loop over each row: the K largest probabilities, largest first, a tie going
    to the lower expert; the weights' gradient lands on the chosen experts only."""
    gen = torch.Generator().manual_seed(top_k)
    probs = torch.softmax(torch.randn(64, 8, generator=gen), -1)
    probs[::4, 5] = probs[::4, 2] = probs[::4].max(-1).values + 0.01  # planted ties for first
    probs = probs.requires_grad_()
    weights, experts = top_k_choices(probs, top_k)
    for t, row in enumerate(probs.tolist()):
        order = sorted(range(8), key=lambda e: (-row[e], e))[:top_k]
        if top_k == 1:  # torch.max's documented tie rule; topk's order among ties is its own
            assert experts[t].tolist() == order
        assert sorted(experts[t].tolist(), key=lambda e: (-row[e], e)) == order
        assert weights[t].tolist() == [row[e] for e in experts[t].tolist()]
    weights.sum().backward()
    chosen = torch.zeros(64, 8).scatter_(1, experts, 1.0)
    assert torch.equal(probs.grad, chosen)


def test_routing_stats_balance():
    router = TopKRouter(4, 4, 1)
    with torch.no_grad():
        router.weight_ED.copy_(torch.eye(4) * 10)
    out = router(torch.eye(4))
    assert out.stats.max_over_mean_load == pytest.approx(1.0)
    assert out.stats.tokens_per_expert_E.tolist() == [1, 1, 1, 1]


def test_untied_and_tied_embeddings():
    base = dict(d_model=16, n_layers=1, n_heads=2, n_experts=2, top_k=1, seq_len=8,
                vocab_size=20)
    tied = MoELM(ModelConfig(**base, tie_embeddings=True))
    untied = MoELM(ModelConfig(**base))
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight


@pytest.mark.parametrize("accumulated", [False, True])
def test_a_training_micro_step_reads_nothing_back_from_the_device(accumulated):
    """Forward (with padding), the step's load-balance term and backward wait for nothing:
    on a GPU each host read is a sync, 16+ per forward at paper depth."""
    from moe.model.lm import IGNORE_INDEX
    from moe.train.balance import all_ranks_sum, routing_counts, step_balance_term
    from tests.guards import HostSync, no_host_reads

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, seq_len=16,
                      vocab_size=50, experts_backend="torch")
    model = MoELM(cfg)
    idx = torch.randint(0, 50, (2, 16))
    tgt = idx.clone()
    tgt[0, :5] = IGNORE_INDEX  # padding: the router's mask is not all-true
    with no_host_reads():
        out = model(idx, tgt)
        counts = all_ranks_sum(routing_counts(out), 1)
        if accumulated:  # counts of a whole step, e.g. one with no real token in this part
            counts = counts * 0
        lb = step_balance_term(out, counts, cfg.top_k, n_parts=2)
        (out.ce_loss + 1e-2 * lb + 1e-3 * out.z_loss).backward()
        with pytest.raises(HostSync):  # the guard itself sees an `if` on a tensor
            bool(out.ce_loss > 0)
    assert model.blocks[0].ffn.router.weight_ED.grad.abs().sum() > 0
    want = out.routing[0].tokens_per_expert_E.sum()  # dropless: every real token, k slots
    assert int(want) == (32 - 5) * cfg.top_k


def _attention_oracle(x_BTD, wq, wk, wv, wo, n_heads, n_kv, theta):
    """Causal attention from the definition: separate q/k/v projections, RoPE as a rotation
    of each pair (i, i + hs/2) by position * theta^(-2i/hs), softmax over earlier keys."""
    B, T, _ = x_BTD.shape
    hs = wq.shape[0] // n_heads
    q = (x_BTD @ wq.T).view(B, T, n_heads, hs).double()
    k = (x_BTD @ wk.T).view(B, T, n_kv, hs).double()
    v = (x_BTD @ wv.T).view(B, T, n_kv, hs).double()

    def rope(t):
        out = t.clone()
        for pos in range(T):
            for i in range(hs // 2):
                a = pos * theta ** (-2 * i / hs)
                x1, x2 = t[:, pos, :, i], t[:, pos, :, i + hs // 2]
                out[:, pos, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
                out[:, pos, :, i + hs // 2] = x1 * math.sin(a) + x2 * math.cos(a)
        return out

    q, k = rope(q), rope(k)
    y = torch.zeros(B, T, n_heads, hs, dtype=torch.float64)
    for h in range(n_heads):
        kv = h // (n_heads // n_kv)
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kv]) / math.sqrt(hs)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y[:, :, h] = torch.softmax(scores, -1) @ v[:, :, kv]
    return y.view(B, T, -1).float() @ wo.T


@pytest.mark.parametrize("n_kv", [4, 2])
def test_fused_qkv_attention_equals_separate_projections(n_kv):
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=n_kv, n_experts=1,
                      top_k=1, seq_len=8, vocab_size=20)
    model = MoELM(cfg)
    attn = model.blocks[0].attn
    wq, wk, wv = (w.detach().clone() for w in attn.qkv_weights())
    x = torch.randn(2, 7, 32)
    want = _attention_oracle(x, wq, wk, wv, attn.wo.weight.detach(), 4, n_kv, cfg.rope_theta)
    torch.testing.assert_close(attn(x, model.rope_cos, model.rope_sin), want, **TOL[torch.float32])


@pytest.mark.parametrize("hs", [8, 16])
def test_rope_by_half_swap_equals_the_pairwise_rotation_bitwise(hs):
    """rotate() computes [x1 cos - x2 sin, x2 cos + x1 sin] with x * C + swap(x) * S: the
    same products and sums, so forward and gradient are bitwise those of the op-by-op form."""
    from moe.model.lm import rope_tables, rotate

    T = 16
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hs, 2).float() / hs)
    angles = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(3, 5, T, hs, requires_grad=True)
    g = torch.randn(3, 5, T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    (want_grad,) = torch.autograd.grad(want, x, g)
    got = rotate(x, *rope_tables(T, hs, 10000.0))
    (got_grad,) = torch.autograd.grad(got, x, g)
    assert torch.equal(got, want)
    assert torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("width", [32, 48, 64])
def test_rms_norm_by_hand_equals_the_definition_and_torch_forward(width):
    """On CPU, training's RMSNorm runs `_RMSNorm` (its backward written out): the forward is
    bitwise torch's, dw bitwise what autograd makes of torch's formula, and x's and w's
    gradients equal those of the float64 definition; a no-grad forward keeps torch's kernel."""
    from moe.model.lm import RMSNorm

    eps = 1e-5
    norm = RMSNorm(width, eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(width))
    w = norm.weight
    x = (3 * torch.randn(3, 7, width)).requires_grad_()
    g = torch.randn(3, 7, width)
    got = norm(x)
    assert type(got.grad_fn).__name__ == "_RMSNormBackward"
    dx, dw = torch.autograd.grad(got, (x, w), g)
    want = F.rms_norm(x, (width,), w, eps)
    _, dw_torch = torch.autograd.grad(want, (x, w), g)
    assert torch.equal(got, want)
    assert torch.equal(dw, dw_torch)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    want64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    dx64, dw64 = torch.autograd.grad(want64, (x64, w64), g.double())
    torch.testing.assert_close(got.double(), want64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert norm(x).grad_fn is None
        torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=1e-6)


def _attention_from_the_definition(q, k, v, g):
    """softmax(q k^T / sqrt(hs) + causal mask) v and its gradients, in float64."""
    T, hs = q.shape[-2:]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    want = torch.softmax(scores, -1) @ v64
    return want, torch.autograd.grad(want, (q64, k64, v64), g.double())


@pytest.mark.parametrize(("hs", "T", "path"), [
    (4, 24, "scores"), (8, 24, "scores"), (12, 24, "scores"), (8, 256, "scores"),
    (8, 257, "padded"), (4, 300, "padded"), (16, 24, "sdpa"), (32, 24, "sdpa")])
def test_cpu_causal_attention_of_every_path_equals_the_definition(hs, T, path):
    """On CPU, heads below 16 run through their T x T scores up to T = 256 and zero-padded
    beyond; outputs and all three gradients match softmax(q k^T / sqrt(hs)) v computed from
    the definition in float64. q, k and v are strided views, as the model passes them."""
    from moe.model.lm import attention_path, causal_attention

    B, nh = 2, 3
    qkv = torch.randn(B, T, 3 * nh, hs, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.split(nh, dim=2))
    g = torch.randn(B, nh, T, hs)
    assert attention_path(q) == path
    got = causal_attention(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    want, want_grads = _attention_from_the_definition(q, k, v, g)
    assert got.shape == (B, nh, T, hs)
    torch.testing.assert_close(got, want.float(), **TOL[torch.float32])
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b.float(), **TOL[torch.float32])
    if path == "sdpa":  # torch's own call, bit for bit
        assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_scores_attention_in_groups_of_pairs_equals_the_definition(monkeypatch):
    """The scores path works through (batch, head) pairs a group at a time: with groups of
    1 and 2 pairs (and a last group of fewer) it still equals the definition, and a forward
    under no_grad (scoring) gives the same output."""
    import moe.model.lm as lm

    B, nh, T, hs = 3, 5, 16, 8
    q, k, v = (torch.randn(B, nh, T, hs, requires_grad=True) for _ in range(3))
    g = torch.randn(B, nh, T, hs)
    want, want_grads = _attention_from_the_definition(q, k, v, g)
    for pairs in (1, 2, 4):
        monkeypatch.setattr(lm, "CPU_SCORES_ATTENTION_GROUP", pairs * T * T)
        assert lm._group_size(T) == pairs
        got = lm.causal_attention(q, k, v)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), g), want_grads, strict=True):
            torch.testing.assert_close(a, b.float(), **TOL[torch.float32])
        torch.testing.assert_close(got, want.float(), **TOL[torch.float32])
        with torch.no_grad():
            torch.testing.assert_close(lm.causal_attention(q, k, v), got)


def test_attention_paths_follow_the_cpu_rule():
    """The scores path only for fp32 CPU heads below 16 over at most 256 positions."""
    from moe.model.lm import attention_path

    assert attention_path(torch.empty(16, 4, 128, 8)) == "scores"
    assert attention_path(torch.empty(16, 4, 128, 16)) == "sdpa"
    assert attention_path(torch.empty(16, 4, 512, 8)) == "padded"
    assert attention_path(torch.empty(16, 4, 128, 8, dtype=torch.bfloat16)) == "padded"
    assert attention_path(torch.empty(16, 4, 128, 8, device="meta")) == "sdpa"


def test_checkpoints_with_separate_qkv_load_and_init_draws_are_unchanged():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
                      seq_len=8, vocab_size=20)
    torch.manual_seed(3)
    model = MoELM(cfg)
    # replay the draws of the layout with separate wq, wk, wv: the modules' own inits at
    # construction (embedding, then per block q, k, v, o; the head), then reset_parameters
    # (embed, head, per block q, k, v, o, experts, router): the same initial weights
    torch.manual_seed(3)
    torch.nn.Embedding(20, 32)
    for _ in range(2):
        for rows in (32, 16, 16, 32):
            torch.nn.Linear(32, rows, bias=False)
    torch.nn.Linear(32, 20, bias=False)
    gen = {}
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    gen["embed"] = torch.empty(20, 32).normal_(std=std)
    gen["head"] = torch.empty(20, 32).normal_(std=std)
    for i in range(2):
        for name, rows in (("wq", 32), ("wk", 16), ("wv", 16)):
            gen[f"{i}.{name}"] = torch.empty(rows, 32).normal_(std=std)
        gen[f"{i}.wo"] = torch.empty(32, 32).normal_(std=out_std)
        gen[f"{i}.w13"] = torch.empty(4, 32, 2 * cfg.d_hidden).normal_(std=std)
        gen[f"{i}.w2"] = torch.empty(4, cfg.d_hidden, 32).normal_(std=out_std)
        gen[f"{i}.router"] = torch.empty(4, 32).normal_(std=std)
    state = model.state_dict()
    for i in range(2):
        fused = torch.cat([gen[f"{i}.{n}"] for n in ("wq", "wk", "wv")])
        assert torch.equal(state[f"blocks.{i}.attn.wqkv.weight"], fused)
        assert torch.equal(state[f"blocks.{i}.ffn.router.weight_ED"], gen[f"{i}.router"])
    # an old checkpoint (separate wq, wk, wv) loads into the fused layout
    old = dict(state)
    for i in range(2):
        wq, wk, wv = old.pop(f"blocks.{i}.attn.wqkv.weight").split([32, 16, 16])
        old.update({f"blocks.{i}.attn.wq.weight": wq, f"blocks.{i}.attn.wk.weight": wk,
                    f"blocks.{i}.attn.wv.weight": wv})
    fresh = MoELM(cfg)
    fresh.load_state_dict(old)
    idx = torch.randint(0, 20, (2, 8))
    assert torch.equal(fresh(idx).logits_BTV, model(idx).logits_BTV)
    del old["blocks.0.attn.wk.weight"]
    with pytest.raises(ValueError, match="wqkv"):
        MoELM(cfg).load_state_dict(old)

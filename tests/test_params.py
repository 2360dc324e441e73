"""Parameter and FLOP counting: exact against built models, and the paper's sizes."""

from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from moe.config import ModelConfig, load_config
from moe.model import MoELM
from moe.params import (
    count_params,
    estimate_train_memory,
    forward_flops_per_token,
    train_flops_per_token,
)
from moe.train.schedule import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_experts=1, top_k=1),
    dict(n_experts=16, top_k=4, tie_embeddings=True),
    dict(n_heads=4, n_kv_heads=2, ffn_mult=3.0),
])
def test_counts_equal_numel_of_built_model(kw):
    base = dict(d_model=32, n_layers=3, n_heads=4, vocab_size=77, seq_len=16, n_experts=8,
                top_k=2)
    cfg = ModelConfig(**{**base, **kw})
    model = MoELM(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.head.weight.numel())
    assert counts.embedding == emb
    expert_numel = sum(b.ffn.experts.w13_ED2H.numel() + b.ffn.experts.w2_EHD.numel()
                       for b in model.blocks)
    assert counts.experts_total == expert_numel
    assert counts.active == counts.total - expert_numel * (1 - cfg.top_k / cfg.n_experts)


@pytest.mark.parametrize("name,total,active", [
    ("d512-E8-k2", 320e6, 170e6),
    ("d2048-E128-k16", 52.2e9, 7.1e9),
])
def test_paper_sizes_within_one_percent(name, total, active):
    cfg = load_config(ROOT / "configs" / "paper" / f"{name}.toml")
    counts = count_params(cfg.model)  # 52B parameters, counted without building anything
    assert counts.total == pytest.approx(total, rel=0.01)
    assert counts.active == pytest.approx(active, rel=0.01)


def test_flops_follow_6n_plus_attention():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_experts=8, top_k=2, seq_len=128)
    c = count_params(cfg)
    head = cfg.vocab_size * cfg.d_model
    matmul = c.attention + c.router + c.experts_active + head
    attn = 2 * cfg.n_layers * cfg.seq_len * cfg.d_model
    assert forward_flops_per_token(cfg) == 2 * (matmul + attn)
    assert train_flops_per_token(cfg) == 3 * forward_flops_per_token(cfg)
    # counted matmul params are exactly the weights a token multiplies by
    model = MoELM(cfg)
    used = sum(p.numel() for n, p in model.named_parameters()
               if p.ndim >= 2 and "embed" not in n and "experts" not in n)
    assert matmul == used + c.experts_active
    assert torch.is_tensor(model.head.weight)


def test_estimated_states_equal_the_built_model_and_optimizer():
    """Parameters, gradients and AdamW moments, counted on the real objects after a step."""
    cfg = tiny_config()
    model = MoELM(cfg.model)
    opt = build_optimizer(model, cfg.train)
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    model(x, x).ce_loss.backward()
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for s in opt.state.values()
                  for v in s.values() if torch.is_tensor(v) and v.dim())
    est = estimate_train_memory(cfg)
    assert est.params == weights and est.optimizer == grads + moments


def test_activations_scale_with_the_micro_batch():
    one = estimate_train_memory(tiny_config("train.batch_size=8"))
    two = estimate_train_memory(tiny_config("train.batch_size=16"))
    accum = estimate_train_memory(tiny_config("train.batch_size=16", "train.grad_accum=2"))
    assert two.activations == 2 * one.activations and accum.activations == one.activations
    ranks = estimate_train_memory(tiny_config("train.batch_size=16"), world=2)
    assert ranks.activations == one.activations and ranks.params == one.params
    sharded = estimate_train_memory(tiny_config("train.batch_size=16"), world=2,
                                    shard_states=True)
    assert sharded.params == one.params // 2

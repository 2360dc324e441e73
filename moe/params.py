"""Exact parameter and FLOP counts from a `ModelConfig`, without building the model.

A 52B-parameter configuration is counted in microseconds; `tests/test_params.py`
checks every count against `sum(p.numel())` of a built model.

Per block (D = d_model, H = expert hidden = ffn_mult * D, E experts, K top-k,
nh/nkv heads, hs = D / nh):
    attention   D*nh*hs (q) + 2*D*nkv*hs (k, v) + nh*hs*D (o)
    norms       2*D
    router      D*E              (absent when E = 1: a dense FFN has no router)
    experts     E * 3*D*H        (SwiGLU: gate, up, down)
Plus the input embedding V*D, the output head V*D (shared when tied) and the
final norm D.

"Active" parameters are those one token uses: the same sum with K experts in
place of E. Embedding parameters are the input embedding plus the untied output
head; the paper's "total" and "active" counts include them (its d512-E8-k2 is
320M total / 170M active).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig, RunConfig


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    total: int
    """All parameters."""
    active: int
    """Parameters one token's forward pass uses (K of E experts)."""
    embedding: int
    """Input embedding + output head (counted once when tied)."""
    attention: int
    """All attention projections, all layers."""
    experts_total: int
    """All expert weights, all layers."""
    experts_active: int
    """The K experts' weights one token uses, all layers."""
    router: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact counts for the model `moe.model.MoELM(cfg)` builds."""
    D, H, L = cfg.d_model, cfg.d_hidden, cfg.n_layers
    hs = cfg.head_dim
    attention = L * (D * cfg.n_heads * hs * 2 + 2 * D * cfg.kv_heads * hs)
    norms = L * 2 * D + D
    router = 0 if cfg.is_dense else L * D * cfg.n_experts
    per_expert = 3 * D * H
    experts_total = L * cfg.n_experts * per_expert
    experts_active = L * cfg.top_k * per_expert
    embedding = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    shared = attention + norms + router + embedding
    return ParamCounts(total=shared + experts_total, active=shared + experts_active,
                       embedding=embedding, attention=attention, experts_total=experts_total,
                       experts_active=experts_active, router=router)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward FLOPs per token: 2 per multiply-add of every matmul a token touches.

    2 * (attention projections + router + K experts + output head) for the
    weights, plus attention scores and the weighted sum of values,
    2 * 2 * T * D per layer at context T, counted in full as Chinchilla
    (Hoffmann et al. 2022, App. F) does, without a causal discount. The input
    embedding is a lookup (no FLOPs) and norms, softmax and SiLU are ignored.
    """
    c = count_params(cfg)
    T = cfg.seq_len if seq_len is None else seq_len
    head = cfg.vocab_size * cfg.d_model
    matmul_params = c.attention + c.router + c.experts_active + head
    attention_scores = cfg.n_layers * 2 * T * cfg.d_model
    return 2.0 * (matmul_params + attention_scores)


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: forward + backward = 3x forward (the 6N rule plus attention)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def resolve_tokens(cfg: RunConfig) -> int:
    """Training tokens: train.tokens, or round(train.tpp * total parameters).

    The paper's convention counts *total* parameters, so at equal tpp a sparse model
    trains on more tokens than a dense one of equal active size.
    """
    if cfg.train.tokens is not None:
        return int(cfg.train.tokens)
    return int(round(cfg.train.tpp * count_params(cfg.model).total))


def format_count(n: float) -> str:
    """1234567 -> '1.23M' (for tables)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes one training process needs at least, by part (fp32 weights and states)."""

    params: int
    """Weights."""
    optimizer: int
    """Gradients plus AdamW's two moments."""
    activations: int
    """Tensors kept for the backward pass of one micro-batch, plus the logits."""
    micro_batch: int
    """Sequences per micro-batch on this process."""

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.activations


def estimate_train_memory(cfg: RunConfig, world: int = 1, *, shard_states: bool = False,
                          attention_scores: bool = True) -> MemoryEstimate:
    """A lower-bound-style estimate of one rank's training memory, without building anything.

    Weights, gradients and AdamW moments are 4 x 4 bytes per parameter (divided by
    `world` when `shard_states`, as FSDP does). Activations per layer and token: about
    ten D-wide tensors (norms, q/k/v, attention output, residuals), k routed copies of
    the expert input and 3 expert hidden tensors each, the router logits, and (with
    `attention_scores`, the non-fused CPU path) the T x T probabilities of every head;
    then the logits with their softmax and gradient. Used to refuse runs that cannot fit
    before anything is allocated (`moe.train.resources`).
    """
    m, t = cfg.model, cfg.train
    n = count_params(m).total
    shards = world if shard_states else 1
    micro = max(1, t.batch_size // t.grad_accum // max(1, world))
    tokens = micro * m.seq_len
    per_token_layer = 10 * m.d_model + m.top_k * (3 * m.d_hidden + 2 * m.d_model) + m.n_experts
    scores = micro * m.n_heads * m.seq_len * m.seq_len * 2 if attention_scores else 0
    floats = m.n_layers * (tokens * per_token_layer + scores) + 3 * tokens * m.vocab_size
    return MemoryEstimate(params=4 * n // shards, optimizer=12 * n // shards,
                          activations=4 * floats, micro_batch=micro)

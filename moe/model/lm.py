"""A Mixtral-style decoder-only MoE language model.

Pre-norm blocks: x + Attn(RMSNorm(x)), then x + MoE(RMSNorm(x)). Attention uses
rotary position embeddings and `F.scaled_dot_product_attention` (causal).
Every block has an MoE FFN (Router -> Dispatch -> Experts -> Combine); with
n_experts = 1 it is an ordinary SwiGLU FFN with no router.

Shape legend: B batch, T sequence, D model width, V vocabulary, E experts,
K top-k, nh/nkv query/key-value heads, hs head size. N = B*T flattened tokens.

The forward pass returns a `ModelOutput`: logits plus the auxiliary losses and
per-layer routing statistics as values; the model holds no state between calls.
Generation passes a `KVCache` (the caller's object, not module state): keys and
values of earlier positions are kept, each call runs only the new tokens, and
left-padded rows get per-row RoPE positions and a mask that hides their padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.errors import BadInput
from moe.model.experts import SwiGLUExperts, init_std_for_output
from moe.model.router import RoutingStats, TopKRouter

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelOutput:
    logits_BTV: torch.Tensor
    ce_loss: torch.Tensor | None
    """Mean cross-entropy (nats/token) over targets != IGNORE_INDEX, if targets were given."""
    lb_loss: torch.Tensor
    """Load-balance loss averaged over MoE layers (0 for a dense model)."""
    z_loss: torch.Tensor
    """Router z-loss averaged over MoE layers (0 for a dense model)."""
    routing: tuple[RoutingStats, ...]
    """One entry per MoE layer (empty for a dense model)."""
    prob_sums: tuple[torch.Tensor, ...] = ()
    """Per MoE layer: router probabilities summed over the real tokens [E] (differentiable)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose precision at large D. Both paths
        # compute x * rsqrt(mean(x^2) + eps) * w.
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, w = x.float(), self.weight.float()
            if _rms_norm_by_hand(xf, w):
                y = _RMSNorm.apply(xf, w, self.eps)
            else:
                y = F.rms_norm(xf, (x.shape[-1],), w, self.eps)
        return y.to(x.dtype)


def _rms_norm_by_hand(x: torch.Tensor, w: torch.Tensor) -> bool:
    """`_RMSNorm` where autograd would differentiate torch's formula op by op: on CPU, eager,
    with a gradient to compute (no-grad forwards keep torch's kernel)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))


class _RMSNorm(torch.autograd.Function):
    """RMSNorm y = x r w, r = rsqrt(mean(x^2) + eps) per row, with its backward written out:
    with gw = g w, dx = r (gw - x r mean(gw x r)) and dw = the sum over rows of g x r.

    On CPU torch differentiates `F.rms_norm` through its op-by-op formula (pow, mean, add,
    rsqrt, two muls, and the backward of each): forward + backward of 2048 x 64 took 0.63 ms
    that way and 0.42 ms here, 2048 x 32 0.33 and 0.23 ms, one thread
    (benchmarks/results/bench_cpu_ops-2026-12-03.txt). The forward is the same ops as
    torch's formula (bitwise equal), dw the same product and sum (bitwise equal); dx differs
    from torch's by rounding (tests/test_model.py checks all three against the float64
    definition)."""

    @staticmethod
    def forward(ctx, x, w, eps: float):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xr = x * r
        ctx.save_for_backward(xr, r, w)
        return xr * w

    @staticmethod
    def backward(ctx, g):
        xr, r, w = ctx.saved_tensors
        width = xr.shape[-1]
        gw = g * w
        m = torch.linalg.vecdot(gw, xr).unsqueeze(-1)
        dx = torch.addcmul(gw, xr, m, value=-1.0 / width).mul_(r)
        dw = (g * xr).reshape(-1, width).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def rope_tables(seq_len: int, head_dim: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [T, hs] (Su et al. 2021): cos(angles) twice, and sin(angles) with the
    first half negated, so that rotating is `x * cos + swap_halves(x) * sin` (see rotate)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles_TF = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    cos_TF, sin_TF = angles_TF.cos(), angles_TF.sin()
    return torch.cat([cos_TF, cos_TF], -1), torch.cat([-sin_TF, sin_TF], -1)


def apply_rope(x_BhTs: torch.Tensor, cos_Ts: torch.Tensor, sin_Ts: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hs/2], x[..., hs/2:]) by position-dependent angles."""
    T = x_BhTs.shape[-2]
    return rotate(x_BhTs, cos_Ts[:T], sin_Ts[:T])


def rotate(x_BhTs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with `rope_tables` broadcastable to x's [..., T, hs] (per-row positions too).

    With x = [x1, x2] and angles a, the rotation is [x1 cos a - x2 sin a, x2 cos a + x1 sin a]
    = x * [cos a, cos a] + [x2, x1] * [-sin a, sin a]: the same products and sums, hence the
    same bits, as the op-by-op formula (tests/test_model.py), in 4 ops instead of 8 (and
    fewer in the backward). Rolling the last dim by hs/2 swaps its halves.
    """
    xf = x_BhTs.float()
    out = xf * cos + xf.roll(xf.shape[-1] // 2, -1) * sin
    return out.to(x_BhTs.dtype)


CPU_ATTENTION_MIN_HEAD = 16
"""On CPU, attention of head size below this runs zero-padded to it (training and scoring
forwards; not KV-cached decoding) where it does not run through its scores
(`CPU_SCORES_ATTENTION_MAX_SEQ`). torch's CPU flash-attention kernel is faster at head
size 16 than at 4, 8, 12 or 32 (forward + backward, B16 x 4 heads x T128, one thread: 7.5
ms at head size 8, 5.6 ms padded to 16, 4.9 ms at 16; benchmarks/results/bench_cpu_ops.txt,
where padding wins or ties at every size below 16 and every T). The zero
columns add exact zeros to q.k and give zero output columns that are cut off; the scale
stays 1/sqrt(hs). A fixed rule, not a timed probe: a run resumed on another machine must
take the same path."""


CPU_SCORES_ATTENTION_MAX_SEQ = 256
"""On CPU, fp32 attention of head size below `CPU_ATTENTION_MIN_HEAD` over at most this many
positions runs through its T x T scores (`_ScoresAttention`), not the padded flash kernel.
Forward + backward, B16 x 4 heads, one thread (benchmarks/results/bench_cpu_ops.txt): the
scores path takes 0.5-0.8 of the padded kernel's time at T = 64 and 128, 0.6-0.85 at 256,
and 1.1-1.3x at 512. At head sizes 16 and above it is no faster than torch's own kernel
(0.9-1.1x), which keeps them. Like the padding, a fixed rule of the shapes, so a resumed
run takes the same path on any machine. The probabilities are kept for the backward (two
B x nh x T x T tensors at a time), which the memory estimate counts on CPU
(`moe.params.estimate_train_memory`)."""

CPU_SCORES_ATTENTION_GROUP = 1 << 17
"""`_ScoresAttention` works through the (batch, head) pairs a group at a time, so that one
group's scores (at most this many fp32 elements, 512 KiB) stay in a core's L2 cache between
the matmul that writes them and the softmax and matmul that read them: 8 pairs at T = 128.
There, B16 x 4 heads (benchmarks/results/bench_cpu_ops.txt), groups of 2 to 16 pairs are
within 10% of each other, and one pair or all 64 at once take about 20% longer."""


def attention_path(q: torch.Tensor) -> str:
    """Which kernel `causal_attention` runs for q [B, nh, T, hs]: "scores"
    (`_ScoresAttention`), "padded" (flash, zero-padded to `CPU_ATTENTION_MIN_HEAD`) or
    "sdpa" (torch's own choice, always on GPU and under torch.compile)."""
    if q.device.type != "cpu" or torch.compiler.is_compiling() \
            or q.shape[-1] >= CPU_ATTENTION_MIN_HEAD:
        return "sdpa"
    if q.dtype == torch.float32 and q.shape[-2] <= CPU_SCORES_ATTENTION_MAX_SEQ:
        return "scores"
    return "padded"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True)` [B, nh, T, hs], by the
    kernel `attention_path` names."""
    path = attention_path(q)
    if path == "scores":
        return _ScoresAttention.apply(q, k, v)
    if path == "padded":
        return padded_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through torch's kernel with heads zero-padded to
    `CPU_ATTENTION_MIN_HEAD` (the scale stays 1/sqrt(hs); the padded output columns are
    cut off)."""
    hs = q.shape[-1]
    pad = (0, max(CPU_ATTENTION_MIN_HEAD - hs, 0))
    y = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad),
                                       is_causal=True, scale=hs ** -0.5)
    return y[..., :hs]


class _ScoresAttention(torch.autograd.Function):
    """Causal softmax attention through its T x T scores, a group of (batch, head) pairs at
    a time (`CPU_SCORES_ATTENTION_GROUP`).

    Every matmul whose result is [T, hs] computes its transpose [hs, T] instead (v^T p^T,
    not p v): at head size 8, MKL's fp32 gemm takes about 3x as long when the result's rows
    are hs wide as when they are T wide (8 pairs of 128 x 128 times 128 x 8, one thread;
    the same at head size 16: benchmarks/results/bench_cpu_ops.txt). Outputs and gradients
    are returned as transposed views.

    Forward: s = scale q k^T + causal mask, p = softmax(s), y = p v. Backward, from the
    saved p: dv = p^T dy, dp = dy v^T, ds = p * (dp - rowsum(dp * p)), dq = scale ds k,
    dk = scale ds^T q.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        B, nh, T, hs = q.shape
        scale, size = hs ** -0.5, _group_size(T)
        q3, k3, v3 = (t.reshape(B * nh, T, hs) for t in (q, k, v))
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        p = q3.new_empty(B * nh, T, T)
        y_T = q3.new_empty(B * nh, hs, T)
        for q_g, kT_g, vT_g, p_g, pT_g, yT_g in zip(
                q3.split(size), k3.transpose(1, 2).split(size), v3.transpose(1, 2).split(size),
                p.split(size), p.transpose(1, 2).split(size), y_T.split(size), strict=True):
            torch.softmax(torch.baddbmm(mask, q_g, kT_g, alpha=scale), -1, out=p_g)
            torch.bmm(vT_g, pT_g, out=yT_g)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q3, k3, v3, p)
            ctx.scale = scale
        return y_T.view(B, nh, hs, T).transpose(-1, -2)

    @staticmethod
    def backward(ctx, dy):
        q3, k3, v3, p = ctx.saved_tensors
        B, nh, T, hs = dy.shape
        size = _group_size(T)
        dy3 = dy.reshape(B * nh, T, hs)
        dq_T, dk_T, dv_T = (q3.new_empty(B * nh, hs, T) for _ in range(3))
        for dy_g, dyT_g, vT_g, p_g, kT_g, qT_g, dqT_g, dkT_g, dvT_g in zip(
                dy3.split(size), dy3.transpose(1, 2).split(size),
                v3.transpose(1, 2).split(size), p.split(size), k3.transpose(1, 2).split(size),
                q3.transpose(1, 2).split(size), dq_T.split(size), dk_T.split(size),
                dv_T.split(size), strict=True):
            torch.bmm(dyT_g, p_g, out=dvT_g)
            ds = torch._softmax_backward_data(torch.bmm(dy_g, vT_g), p_g, -1, p.dtype)
            torch.bmm(kT_g, ds.transpose(1, 2), out=dqT_g)
            torch.bmm(qT_g, ds, out=dkT_g)
        dq_T.mul_(ctx.scale)
        dk_T.mul_(ctx.scale)
        return tuple(d.view(B, nh, hs, T).transpose(-1, -2) for d in (dq_T, dk_T, dv_T))


def _group_size(T: int) -> int:
    """(batch, head) pairs per group of `_ScoresAttention` (`CPU_SCORES_ATTENTION_GROUP`)."""
    return max(1, CPU_SCORES_ATTENTION_GROUP // (T * T))


class KVCache:
    """Keys and values of every layer for a batch of left-padded rows, pre-allocated.

    Row b holds `pad_B[b]` padding tokens, then its tokens; all rows advance together,
    so one `length` counts the filled positions. Each layer's buffers [B, nkv, L, hs]
    are allocated on first use in the dtype of its keys (bf16 under autocast).
    """

    def __init__(self, n_layers: int, pad_B: torch.Tensor, max_len: int):
        self.pad_B = pad_B
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def write(self, layer: int, k_BhTs: torch.Tensor, v_BhTs: torch.Tensor):
        """Store the new positions; returns all keys/values so far [B, nkv, length+T, hs]."""
        if self.k[layer] is None:
            B, nkv, _, hs = k_BhTs.shape
            self.k[layer] = k_BhTs.new_zeros(B, nkv, self.max_len, hs)
            self.v[layer] = v_BhTs.new_zeros(B, nkv, self.max_len, hs)
        end = self.length + k_BhTs.shape[2]
        self.k[layer][:, :, self.length: end] = k_BhTs
        self.v[layer][:, :, self.length: end] = v_BhTs
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows_B: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch)."""
        self.pad_B = self.pad_B[rows_B]
        self.k = [None if k is None else k[rows_B] for k in self.k]
        self.v = [None if v is None else v[rows_B] for v in self.v]

    def step_inputs(self, T: int, cos_LF: torch.Tensor, sin_LF: torch.Tensor):
        """RoPE tables [B, 1, T, hs] at each row's positions and the mask [B, 1, T, length+T].

        A row's positions count from its first real token; a query sees its row's real keys
        up to itself, and a padding query sees itself only (its output is never used).
        """
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take "
                             f"{self.length + T}")
        abs_T = torch.arange(self.length, self.length + T, device=self.pad_B.device)
        pos_BT = (abs_T.unsqueeze(0) - self.pad_B.unsqueeze(1)).clamp(min=0)
        key_S = torch.arange(self.length + T, device=self.pad_B.device)
        causal_TS = key_S.unsqueeze(0) <= abs_T.unsqueeze(1)
        real_BS = key_S.unsqueeze(0) >= self.pad_B.unsqueeze(1)
        mask_BTS = (causal_TS.unsqueeze(0) & real_BS.unsqueeze(1)) | (
            key_S.unsqueeze(0) == abs_T.unsqueeze(1)).unsqueeze(0)
        return cos_LF[pos_BT].unsqueeze(1), sin_LF[pos_BT].unsqueeze(1), mask_BTS.unsqueeze(1)


@dataclass(frozen=True)
class _Step:
    """What one cached forward call shares across layers."""

    cache: KVCache
    cos_B1Ts: torch.Tensor
    sin_B1Ts: torch.Tensor
    mask_B1TS: torch.Tensor


class Attention(nn.Module):
    """Causal self-attention with q, k and v from one matmul: `wqkv.weight` stacks the rows
    of Wq [nh*hs, D], Wk and Wv [nkv*hs, D] (a pocket model's step is dominated by per-op
    overhead, so one matmul instead of three is a measurable share of it). Checkpoints with
    separate `wq`/`wk`/`wv` are fused when loaded."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * self.n_kv) * cfg.head_dim,
                              bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of Wq [nh*hs, D], Wk and Wv [nkv*hs, D] in the fused weight."""
        return split_qkv(self.wqkv.weight, self.n_heads, self.n_kv)

    def forward(self, x_BTD: torch.Tensor, cos_TF: torch.Tensor,
                sin_TF: torch.Tensor, step: tuple[_Step, int] | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        qkv = self.wqkv(x_BTD).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        # split, not slices: autograd's backward of a split is one concatenation, of each
        # slice a zero-filled copy of the whole qkv gradient
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=2)
        qk, v = qk.transpose(1, 2), v.transpose(1, 2)  # (B,nh+nkv,T,hs), (B,nkv,T,hs)
        mask = None
        if step is None:  # q and k rotate together: one set of RoPE ops, not two
            qk = apply_rope(qk, cos_TF, sin_TF)
        else:  # decoding: per-row positions, keys/values of earlier calls from the cache
            s, layer = step
            qk = rotate(qk, s.cos_B1Ts, s.sin_B1Ts)
        q, k = qk.split([self.n_heads, qk.shape[1] - self.n_heads], dim=1)
        if step is not None:
            k, v = s.cache.write(layer, k, v)
            mask = s.mask_B1TS
        if self.n_kv != self.n_heads:  # grouped-query attention: share each kv head
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = causal_attention(q, k, v)  # (B,nh,T,hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def split_qkv(wqkv: torch.Tensor, n_heads: int, n_kv: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wq, Wk, Wv) row blocks of a fused [(nh + 2 nkv) * hs, D] weight (views)."""
    hs = wqkv.shape[0] // (n_heads + 2 * n_kv)
    return wqkv.split([n_heads * hs, n_kv * hs, n_kv * hs], dim=0)


def _fuse_qkv(module, state_dict, prefix, *_args) -> None:
    """Load-time conversion of checkpoints with separate wq, wk and wv weights."""
    names = [f"{prefix}{w}.weight" for w in ("wq", "wk", "wv")]
    present = [n for n in names if n in state_dict]
    if not present:
        return
    if len(present) < 3:
        raise BadInput(f"checkpoint has only {', '.join(present)} of {', '.join(names)}; "
                         f"all three are needed to build {prefix}wqkv.weight")
    state_dict[f"{prefix}wqkv.weight"] = torch.cat([state_dict.pop(n) for n in names], 0)


class MoEFFN(nn.Module):
    """Router -> Dispatch -> Experts -> Combine; a plain SwiGLU FFN when E = 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = None if cfg.is_dense else TopKRouter(
            cfg.d_model, cfg.n_experts, cfg.top_k, normalize=cfg.norm_topk_prob)
        self.experts = SwiGLUExperts(cfg.d_model, cfg.d_hidden, cfg.n_experts,
                                     backend=cfg.experts_backend)

    def forward(self, x_BTD: torch.Tensor, mask_N: torch.Tensor | None):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        if self.router is None:
            return self.experts.dense_forward(x_ND).view(B, T, D), None
        routed = self.router(x_ND, mask_N)
        y_ND = self.experts(x_ND, routed.expert_idx_TK, routed.weight_TK)
        return y_ND.to(x_BTD.dtype).view(B, T, D), routed


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFFN(cfg)

    def forward(self, x_BTD, cos_TF, sin_TF, mask_N, step=None):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TF, sin_TF, step)
        y_BTD, routed = self.ffn(self.ffn_norm(x_BTD), mask_N)
        return x_BTD + y_BTD, routed


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual outputs (attn wo, expert w2) scaled by 1/sqrt(2L)."""
        std = self.cfg.init_std
        out_std = init_std_for_output(std, self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            with torch.no_grad():  # block by block: the draws of separate q, k, v weights
                for w in block.attn.qkv_weights():
                    nn.init.normal_(w, std=std)
            nn.init.normal_(block.attn.wo.weight, std=out_std)
            block.ffn.experts.reset_parameters(std, out_std)
            if block.ffn.router is not None:
                nn.init.normal_(block.ffn.router.weight_ED, std=std)

    def new_cache(self, pad_B: torch.Tensor, max_len: int) -> KVCache:
        """An empty KV cache for left-padded rows (`pad_B` padding tokens each), see `forward`."""
        if max_len > self.cfg.seq_len:
            raise BadInput(f"a cache of {max_len} positions exceeds "
                             f"model.seq_len={self.cfg.seq_len}")
        return KVCache(self.cfg.n_layers, pad_B, max_len)

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                cache: KVCache | None = None) -> ModelOutput:
        """Logits of every position; with `cache`, idx_BT are the next tokens after the
        cached ones, the cache advances by T, and logits_BTV holds the last position only."""
        B, T = idx_BT.shape
        if T > self.cfg.seq_len:
            raise BadInput(f"sequence of {T} tokens exceeds model.seq_len={self.cfg.seq_len}")
        if cache is not None and targets_BT is not None:
            raise ValueError("targets and a KV cache do not mix: the loss needs every position")
        # Routing losses count only real tokens: those with a target to predict.
        mask_N = None if targets_BT is None else (targets_BT != IGNORE_INDEX).reshape(-1)
        step = None if cache is None else _Step(cache, *cache.step_inputs(
            T, self.rope_cos, self.rope_sin))
        x_BTD = self.embed(idx_BT)
        lb_terms, z_terms, stats, prob_sums = [], [], [], []
        for layer, block in enumerate(self.blocks):
            x_BTD, routed = block(x_BTD, self.rope_cos, self.rope_sin, mask_N,
                                  None if step is None else (step, layer))
            if routed is not None:
                lb_terms.append(routed.lb_loss)
                z_terms.append(routed.z_loss)
                stats.append(routed.stats)
                prob_sums.append(routed.prob_sum_E)
        if cache is not None:
            cache.length += T
            x_BTD = x_BTD[:, -1:]
        logits_BTV = self.head(self.norm(x_BTD))
        ce = None
        if targets_BT is not None:
            ce = F.cross_entropy(logits_BTV.float().view(B * T, -1), targets_BT.reshape(-1),
                                 ignore_index=IGNORE_INDEX)
        zero = logits_BTV.new_zeros((), dtype=torch.float32)
        lb = torch.stack(lb_terms).mean() if lb_terms else zero
        zl = torch.stack(z_terms).mean() if z_terms else zero
        return ModelOutput(logits_BTV=logits_BTV, ce_loss=ce, lb_loss=lb, z_loss=zl,
                           routing=tuple(stats), prob_sums=tuple(prob_sums))

"""CPU attention, RoPE, SwiGLU, top-1 and RMSNorm of pocket models: the numbers behind moe.model.

    python benchmarks/bench_cpu_ops.py [--threads 1] [--batch 16] [--heads 4] [--seq 128]

1. Causal attention, forward + backward (q, k, v all need grads), at head sizes 4-32 and
   T = 64-512: `F.scaled_dot_product_attention` as it is, zero-padded to
   `CPU_ATTENTION_MIN_HEAD` (`moe.model.lm.padded_attention`), and through its T x T
   scores (`moe.model.lm._ScoresAttention`); `training` names the one
   `moe.model.lm.attention_path` picks. Then one matmul of the scores path both ways round:
   p v, whose result rows are hs wide, against (v^T p^T)^T, whose rows are T wide; and
   the scores path with groups of 1 to all (batch, head) pairs at once.
2. RoPE forward + backward on the fused q|k heads: the pairwise formula (chunk, four
   products, cat) against `moe.model.lm.rotate` (x * cos + swap_halves(x) * sin).
3. SwiGLU forward + backward on the fused [gate | up] rows of B x T tokens times top-k:
   autograd's op-by-op form (`moe.model.experts.swiglu_reference`, whose backward
   concatenates d gate and d up) against `_SwiGLU` (one gradient buffer), reading the gate
   as a half-row view and as a contiguous copy (training copies it from
   `CPU_SWIGLU_CONTIGUOUS_MIN_HIDDEN` and `CPU_SWIGLU_CONTIGUOUS_MIN_ELEMENTS`).
4. The router's choice of each token's top-1 expert over B x T tokens: `torch.topk` against
   `torch.max` (`moe.model.router.top_k_choices`).
5. RMSNorm forward + backward (x and the weight need grads) of B x T rows at widths 32-64:
   torch's `F.rms_norm`, which autograd differentiates op by op on CPU, against
   `moe.model.lm._RMSNorm` (the backward written out), which training runs on CPU.

The process keeps freed memory on its heap as `moe train` does on CPU
(`moe.train.resources.retain_freed_memory`), so no timing pays the page faults of
memory returned to the kernel between calls.

Times are the best of `--rounds` interleaved rounds (milliseconds), so a burst of load from
elsewhere does not land on one variant only; compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import moe.model.lm as lm
from moe.model.experts import _gate_copied, _SwiGLU, swiglu_reference
from moe.model.lm import (
    CPU_ATTENTION_MIN_HEAD,
    _RMSNorm,
    _ScoresAttention,
    attention_path,
    padded_attention,
    rope_tables,
    rotate,
)
from moe.model.router import top_k_choices
from moe.train.resources import retain_freed_memory


def best_ms(fns: dict, rounds: int, min_time_s: float) -> dict:
    """Best milliseconds per call of each function over interleaved rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_time_s or n < 3:
                fn()
                n += 1
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e3)
    return best


def attention_calls(B: int, nh: int, T: int, hs: int) -> dict:
    q, k, v = (torch.randn(B, nh, T, hs, requires_grad=True) for _ in range(3))
    g = torch.randn(B, nh, T, hs)

    def plain():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    def padded():
        padded_attention(q, k, v).backward(g)

    def scores():
        _ScoresAttention.apply(q, k, v).backward(g)

    calls = {"sdpa": plain, "scores": scores}
    if hs < CPU_ATTENTION_MIN_HEAD:
        calls["padded"] = padded
    return calls


def group_calls(B: int, nh: int, T: int, hs: int, pairs: int) -> dict:
    """The scores path with groups of `pairs` (batch, head) pairs."""
    calls = attention_calls(B, nh, T, hs)

    def grouped():
        saved = lm.CPU_SCORES_ATTENTION_GROUP
        lm.CPU_SCORES_ATTENTION_GROUP = pairs * T * T
        try:
            calls["scores"]()
        finally:
            lm.CPU_SCORES_ATTENTION_GROUP = saved

    return {pairs: grouped}


def layout_calls(pairs: int, T: int, hs: int) -> dict:
    p = torch.softmax(torch.randn(pairs, T, T), -1)
    v = torch.randn(pairs, T, hs)

    def rows_hs_wide():
        torch.bmm(p, v)

    def rows_t_wide():
        torch.bmm(v.transpose(1, 2), p.transpose(1, 2))

    return {"p v": rows_hs_wide, "v^T p^T": rows_t_wide}


def rope_calls(B: int, nh: int, T: int, hs: int) -> dict:
    qkv = torch.randn(B, T, 3 * nh, hs, requires_grad=True)  # rotated slice: a strided view
    g = torch.randn(B, 2 * nh, T, hs)
    angles = torch.outer(torch.arange(T).float(),
                         1.0 / 10000.0 ** (torch.arange(0, hs, 2).float() / hs))
    cos, sin = angles.cos(), angles.sin()
    cos_full, sin_full = rope_tables(T, hs, 10000.0)

    def pairwise():
        x1, x2 = qkv[:, :, : 2 * nh].transpose(1, 2).chunk(2, dim=-1)
        torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).backward(g)

    def swap():
        rotate(qkv[:, :, : 2 * nh].transpose(1, 2), cos_full, sin_full).backward(g)

    return {"pairwise": pairwise, "swap": swap}


def swiglu_calls(rows: int, hidden: int) -> dict:
    gate_up = torch.randn(rows, 2 * hidden, requires_grad=True)
    g = torch.randn(rows, hidden)

    def autograd():
        torch.autograd.grad(swiglu_reference(gate_up), gate_up, g)

    def one_buffer(copy_gate: bool):
        return lambda: torch.autograd.grad(_SwiGLU.apply(gate_up, copy_gate), gate_up, g)

    return {"autograd": autograd, "view": one_buffer(False), "copy": one_buffer(True)}


def router_calls(tokens: int, n_experts: int) -> dict:
    probs = torch.softmax(torch.randn(tokens, n_experts), dim=-1)
    return {"topk": lambda: torch.topk(probs, 1, dim=-1), "max": lambda: top_k_choices(probs, 1)}


def rms_norm_calls(rows: int, width: int) -> dict:
    x = torch.randn(rows, width, requires_grad=True)
    w = (1 + 0.1 * torch.randn(width)).requires_grad_()
    g = torch.randn(rows, width)
    return {"torch": lambda: torch.autograd.grad(F.rms_norm(x, (width,), w, 1e-5), (x, w), g),
            "by hand": lambda: torch.autograd.grad(_RMSNorm.apply(x, w, 1e-5), (x, w), g)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.3)
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, nh, T = args.batch, args.heads, args.seq
    print(f"# torch {torch.__version__}, {args.threads} thread(s), B{B} x {nh} heads x T{T}, "
          f"forward + backward, best of {args.rounds} rounds (ms)")
    print(f"{'T':>4s} {'head size':>9s} {'sdpa':>8s} {'padded':>8s} {'scores':>8s} "
          f"{'training':>9s}  (padded to {CPU_ATTENTION_MIN_HEAD})")
    for seq in sorted({64, 128, 256, 512, T}):
        for hs in (4, 8, 12, 16, 24, 32):
            t = best_ms(attention_calls(B, nh, seq, hs), args.rounds, args.min_time)
            padded = f"{t['padded']:8.2f}" if "padded" in t else f"{'-':>8s}"
            used = attention_path(torch.empty(B, nh, seq, hs))
            print(f"{seq:4d} {hs:9d} {t['sdpa']:8.2f} {padded} {t['scores']:8.2f} {used:>9s}")
    sizes = sorted({1, 2, 4, 8, 16, B * nh, lm._group_size(T)})
    t = best_ms({k: v for n in sizes for k, v in group_calls(B, nh, T, 8, n).items()},
                args.rounds, args.min_time)
    print(f"\n{'pairs':>9s} {'scores':>8s}  (T{T}, head size 8, the scores path with groups of "
          f"this many (batch, head) pairs; training: {lm._group_size(T)})")
    for n in sizes:
        print(f"{n:9d} {t[n]:8.2f}")
    pairs = lm._group_size(T)
    print(f"\n{'head size':>9s} {'p v':>8s} {'v^T p^T':>8s}  (ms; {pairs} pairs of T x T "
          f"probabilities times T x hs values: the result's rows hs or T wide)")
    for hs in (8, 16):
        t = best_ms(layout_calls(pairs, T, hs), args.rounds, args.min_time)
        print(f"{hs:9d} {t['p v']:8.3f} {t['v^T p^T']:8.3f}")
    print(f"\n{'head size':>9s} {'pairwise':>9s} {'swap':>8s}  (RoPE of the q and k heads)")
    for hs in (8, 16):
        t = best_ms(rope_calls(B, nh, T, hs), args.rounds, args.min_time)
        print(f"{hs:9d} {t['pairwise']:9.3f} {t['swap']:8.3f}")
    print(f"\n{'rows':>6s} {'hidden':>6s} {'autograd':>9s} {'gate view':>9s} {'gate copy':>9s} "
          f"{'training':>8s}  (SwiGLU; rows = B x T x top-k; one gradient buffer but autograd)")
    for top_k, hidden in ((1, 64), (1, 128), (2, 128), (8, 64), (8, 96), (8, 128)):
        rows = B * T * top_k
        t = best_ms(swiglu_calls(rows, hidden), args.rounds, args.min_time)
        used = "copy" if _gate_copied(torch.empty(rows, 2 * hidden)) else "view"
        print(f"{rows:6d} {hidden:6d} {t['autograd']:9.3f} {t['view']:9.3f} {t['copy']:9.3f} "
              f"{used:>8s}")
    print(f"\n{'experts':>7s} {'topk':>7s} {'max':>7s}  (top-1 choice of {B * T} tokens)")
    for n_experts in (8, 16, 32):
        t = best_ms(router_calls(B * T, n_experts), args.rounds, args.min_time)
        print(f"{n_experts:7d} {t['topk']:7.3f} {t['max']:7.3f}")
    print(f"\n{'rows':>6s} {'width':>6s} {'torch':>7s} {'by hand':>7s}  "
          f"(RMSNorm; training: by hand)")
    for width in (32, 48, 64):
        t = best_ms(rms_norm_calls(B * T, width), args.rounds, args.min_time)
        print(f"{B * T:6d} {width:6d} {t['torch']:7.3f} {t['by hand']:7.3f}")


if __name__ == "__main__":
    main()

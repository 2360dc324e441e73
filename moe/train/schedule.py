"""Token budget in optimizer steps, the learning-rate schedule and the optimizer."""

from __future__ import annotations

import math

import torch
import torch.distributed

from moe.config import RunConfig, TrainConfig
from moe.params import resolve_tokens


def total_steps(cfg: RunConfig) -> int:
    return max(1, math.ceil(resolve_tokens(cfg) / (cfg.train.batch_size * cfg.model.seq_len)))


def lr_at(step: int, tcfg: TrainConfig, n_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `n_steps`.

    Linear warmup to `lr` over warmup_steps, then: cosine to `final_lr` (cosine);
    flat, with a linear decay to `final_lr` over the last decay_frac of steps (wsd);
    or flat (constant).
    """
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    if tcfg.schedule == "constant":
        return tcfg.lr
    if tcfg.schedule == "wsd":
        decay_steps = max(1, round(tcfg.decay_frac * n_steps))
        decay_start = n_steps - decay_steps
        if step < decay_start:
            return tcfg.lr
        frac = (step - decay_start + 1) / decay_steps
        return tcfg.lr + (tcfg.final_lr - tcfg.lr) * min(1.0, frac)
    span = max(1, n_steps - tcfg.warmup_steps)
    progress = min(1.0, (step - tcfg.warmup_steps + 1) / span)
    return tcfg.final_lr + 0.5 * (tcfg.lr - tcfg.final_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases (1-d tensors) do not.

    torch's fused kernel (one pass over each tensor) where every parameter is a plain tensor:
    on CPU its step is 7x faster than the multi-tensor (`foreach`) one, 3 ms of a 44 ms
    pocket step at 32 experts; sharded (DTensor) parameters keep `foreach`.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kernel = {"fused": True} if not any(_is_sharded(p) for p in decay + no_decay) else \
        {"foreach": True}
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), **kernel)


def _is_sharded(p: torch.Tensor) -> bool:
    """A DTensor (FSDP2, expert parallelism) rather than a plain tensor."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor)

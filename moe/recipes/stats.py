"""Validation loss and per-layer expert load of a model, on a run's validation batches."""

from __future__ import annotations

import math
from typing import Any

import torch

from moe.config import RunConfig
from moe.data.shards import TokenData
from moe.train.step import autocast_for, validation_batches


@torch.no_grad()
def validation_stats(model: torch.nn.Module, data: TokenData, cfg: RunConfig,
                     device: torch.device | str = "cpu", prefix: str = "") -> dict[str, Any]:
    """Flat columns: `val_loss` (as `validation_loss` measures it) and, per MoE layer i,
    `expert_load/i` = max/mean tokens per expert over all validation tokens (1 = balanced),
    `router_entropy/i` (nats), and their means over layers; each key gets `prefix`."""
    model.eval()
    losses, counts, entropies = [], None, None
    for x, y in validation_batches(data, cfg):
        with autocast_for(cfg.train, torch.device(device)):
            out = model(x.to(device), y.to(device))
        losses.append(float(out.ce_loss))
        layer_counts = [s.tokens_per_expert_E.double().cpu() for s in out.routing]
        layer_ent = [s.entropy for s in out.routing]
        counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts,
                                                                             strict=True)]
        entropies = [layer_ent] if entropies is None else [*entropies, layer_ent]
    row: dict[str, Any] = {"val_loss": sum(losses) / len(losses)}
    loads = [float(c.max() / c.mean()) if c.sum() > 0 else math.nan for c in counts or []]
    for i, load in enumerate(loads):
        row[f"expert_load/{i}"] = load
        row[f"router_entropy/{i}"] = sum(e[i] for e in entropies) / len(entropies)
    if loads:
        row["expert_load_mean"] = sum(loads) / len(loads)
    return {f"{prefix}{k}": v for k, v in row.items()}

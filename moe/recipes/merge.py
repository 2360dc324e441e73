"""`moe merge`: a learning-rate decay emulated by averaging checkpoints (WSM).

Tian et al. (ICLR 2026, "WSM: Decay-Free Learning Rate Schedule via Checkpoint
Merging", Theorem 3.1): train at a constant learning rate and keep snapshots
theta_0 .. theta_k (steps s_0 < ... < s_k, `train.save_every`). The merge
sum_j c_j theta_j equals theta_0 minus the updates of the window with update i (the
steps in (s_{i-1}, s_i]) scaled by w_i = sum_{j >= i} c_j. So a target decay
1 >= w_1 >= ... >= w_k >= 0 is emulated by

    c_0 = 1 - w_1,   c_j = w_j - w_{j+1} (0 < j < k),   c_k = w_k,

which are >= 0 and sum to 1. The targets are a decay shape f (f(0) = 1) sampled at
x_i = (s_i - s_0) / (s_k - s_0 + delta), delta the mean snapshot spacing, so for evenly
spaced snapshots x_i = i / (k + 1):

    linear    f(x) = 1 - x            (equals `mean` exactly: c_j = 1 / (k + 1))
    cosine    f(x) = (1 + cos(pi x)) / 2
    1-sqrt    f(x) = 1 - sqrt(x)      (Hagele et al. 2024's cooldown)
    inv-sqrt  f(x) = 1 / sqrt(1 + 15 x)  (an inverse-square-root decay to 1/4 of the peak)
    mean      c_j = 1 / (k + 1): the plain average of the window, boundary included

The window is every snapshot at step >= last - STEPS (the boundary included); a window
holding one snapshot returns it unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe.data.shards import load_data
from moe.errors import BadInput
from moe.io import check_output_dir, claim_output_dir
from moe.model import MoELM
from moe.recipes.stats import validation_stats
from moe.record import build_result
from moe.rundir import RunDir
from moe.train.averaging import load_snapshot, write_weights_run

SHAPES = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + np.cos(np.pi * x)),
    "inv-sqrt": lambda x: 1.0 / np.sqrt(1.0 + 15.0 * x),
    "1-sqrt": lambda x: 1.0 - np.sqrt(x),
}
DECAYS = ("mean", *SHAPES)


def target_coefficients(steps: list[int], decay: str) -> np.ndarray:
    """w_1 .. w_k: the weight each of the window's k updates gets in the merged model."""
    if decay not in DECAYS:
        raise BadInput(f"unknown decay {decay!r}; choose one of {', '.join(DECAYS)}")
    s = np.asarray(steps, dtype=float)
    if s.ndim != 1 or len(s) < 1 or np.any(np.diff(s) <= 0):
        raise BadInput(f"snapshot steps must be increasing, got {list(steps)}")
    k = len(s) - 1
    if k == 0:
        return np.zeros(0)
    if decay == "mean":
        return (k + 1 - np.arange(1, k + 1)) / (k + 1)
    span = s[-1] - s[0]
    x = (s[1:] - s[0]) / (span + span / k)
    return SHAPES[decay](x)


def merge_coefficients(steps: list[int], decay: str) -> np.ndarray:
    """c_0 .. c_k of Theorem 3.1 (>= 0, summing to 1) for snapshots at `steps`."""
    w = target_coefficients(steps, decay)
    if len(w) == 0:
        return np.ones(1)
    c = np.empty(len(w) + 1)
    c[0] = 1.0 - w[0]
    c[1:-1] = w[:-1] - w[1:]
    c[-1] = w[-1]
    assert np.all(c >= -1e-12), "decay shapes are non-increasing and start <= 1"
    return np.clip(c, 0.0, None) / np.clip(c, 0.0, None).sum()


def merge_state_dicts(states: list[dict[str, torch.Tensor]], coeffs) -> dict[str, torch.Tensor]:
    """sum_j c_j states[j], accumulated in float64 (non-float tensors from the last)."""
    merged: dict[str, torch.Tensor] = {}
    for name, last in states[-1].items():
        if not last.is_floating_point():
            merged[name] = last.clone()
            continue
        acc = torch.zeros_like(last, dtype=torch.float64)
        for c, state in zip(coeffs, states, strict=True):
            acc += float(c) * state[name].double()
        merged[name] = acc.to(last.dtype)
    return merged


def window_snapshots(run: RunDir, window: int) -> list[tuple[int, Path]]:
    """The snapshots at step >= last - window, oldest first.

    A window must merge something and lie inside the run: one that holds only the last
    snapshot (0, or shorter than the snapshot spacing) or is longer than the run is an
    error naming the steps that would work, never a silent one-snapshot "merge".
    """
    if window <= 0:
        raise BadInput(f"--window must be a positive number of steps, got {window}")
    snaps = run.list_snapshots()
    if not snaps:
        raise BadInput(f"{run.path} has no snapshots to merge; train it with "
                         "train.save_every > 0 (e.g. --set train.save_every=10)")
    last = snaps[-1][0]
    if window > last:
        raise BadInput(f"--window {window} is longer than the run ({last} steps, snapshots "
                         f"at steps {snaps[0][0]}..{last}); use at most {last}")
    chosen = [(s, p) for s, p in snaps if s >= last - window]
    if len(chosen) < 2:
        need = f"at least {last - snaps[-2][0]}" if len(snaps) > 1 else "a run with more"
        raise BadInput(f"--window {window} holds only the last snapshot (step {last}) of "
                         f"{run.path}: nothing to merge; use {need} steps")
    return chosen


def merge_run(run_dir: str | os.PathLike, *, window: int, decay: str,
              out: str | os.PathLike, device: str | torch.device = "cpu",
              force: bool = False) -> dict[str, Any]:
    """Merge a run's last `window` steps of snapshots into the run directory `out`.

    Its result.json has the merged model's val_loss and expert load, the last snapshot's
    (`last/` columns), the window and the coefficients; returns that record.
    """
    run, target = RunDir(run_dir), RunDir(out)
    device = torch.device(device)
    if target.has_config() or target.is_done():
        raise BadInput(f"{target.path} already holds a run; choose a new --out directory")
    source = str(run.path.resolve())
    check_output_dir(target.path, "merge", source=source, force=force)
    cfg = run.read_config()
    snaps = window_snapshots(run, window)
    steps = [s for s, _ in snaps]
    coeffs = merge_coefficients(steps, decay)
    states = [load_snapshot(run, s, p, device)["model"] for s, p in snaps]
    merged = merge_state_dicts(states, coeffs)
    data = load_data(cfg.data, cfg.model.seq_len)
    model = MoELM(cfg.model).to(device)
    model.load_state_dict(states[-1])
    last = validation_stats(model, data, cfg, device, prefix="last/")
    model.load_state_dict(merged)
    stats = validation_stats(model, data, cfg, device)
    source = (run.read_result() or {}).get("run_id", run.path.name)
    record = build_result(cfg, **stats, **last, recipe="merge", steps=steps[-1])
    record.update({"run_id": target.path.name, "merge.source": source, "merge.decay": decay,
                   "merge.window": int(window), "merge.k": len(steps) - 1,
                   "merge.first_step": steps[0],
                   "merge.coefficients": ",".join(f"{c:.6g}" for c in coeffs)})
    if cfg.eval.tasks:
        from moe.eval import evaluate_tasks, flat_results

        record.update(flat_results(evaluate_tasks(model, data.tokenizer, cfg,
                                                  list(cfg.eval.tasks), device=device)))
    claim_output_dir(target.path, "merge", source=source, force=force)
    write_weights_run(target, cfg, steps[-1], merged, record)
    return record

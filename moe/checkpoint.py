"""Atomic, verified, pickle-free checkpoints of a run, and loading a run's model.

`RUN_DIR/checkpoints/step-00000100.pt` holds the model, optimizer, step, RNG state
and the run id; it is serialised in memory, its SHA-256 is written atomically to
`step-00000100.sha256` and only then are the data written to a temporary name,
fsynced and renamed (`RunDir.write_checkpoint`). Loading uses
`torch.load(weights_only=True)`, so a checkpoint can never run pickled code.

A checkpoint is used only when all of these hold; otherwise it is skipped with a
warning naming why and the previous one is tried:
- its digest file exists and matches (a crash between the writes, a truncated or
  bit-flipped file, all fail here);
- it is a training checkpoint whose stored step equals the step in its file name;
- its recorded run id is the run's (`moe.config.config_hash`, or version 0.1's
  `legacy_config_hash` for run directories written by 0.1);
- its tensors fit the model (and optimizer) it is loaded into: same names, same shapes.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from moe.errors import BadInput
from moe.model import MoELM
from moe.model.experts import upgrade_state_dict
from moe.rundir import RunDir


def save_checkpoint(run: RunDir | os.PathLike, step: int, state: dict[str, Any], *,
                    keep: int = 2) -> Path:
    """Write `state` atomically with its checksum, then keep the newest `keep` verified ones."""
    run = _as_run(run)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = run.write_checkpoint(step, data, hashlib.sha256(data).hexdigest())
    run.prune_checkpoints(keep)
    return path


def run_ids_of(cfg) -> frozenset[str]:
    """The run ids a checkpoint of `cfg`'s run may record (current and version 0.1's)."""
    from moe.config import config_hash, legacy_config_hash

    return frozenset({config_hash(cfg), legacy_config_hash(cfg)})


def _as_run(run: RunDir | os.PathLike) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


def load_verified(run: RunDir, step: int, path: Path, map_location: str | torch.device,
                  run_ids: Collection[str] | None) -> dict[str, Any]:
    """The state in `path` (a checkpoint or snapshot of `run` at `step`), after its digest
    verifies and its step (and, with `run_ids`, its run id) match; ValueError otherwise."""
    data = run.read_checkpoint(path)
    state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError("not a training checkpoint")
    upgrade_state_dict(state["model"])  # written before the fused gate/up weight
    if state["step"] != step:
        raise ValueError(f"it stores step {state['step']!r}, its file name says {step}")
    if run_ids is not None and state.get("run_id") not in run_ids:
        raise ValueError(f"it belongs to run {state.get('run_id')!r}, not to "
                         f"{' or '.join(sorted(run_ids))}")
    return state


def check_fits(module: torch.nn.Module, tensors: dict[str, Any], what: str = "model") -> None:
    """ValueError naming the first parameter whose name or shape differs from `module`'s."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} tensors do not match: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, ref in expected.items():
        got = tensors[name]
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{what} tensor {name} has shape {shape}, the model's is "
                             f"{tuple(ref.shape)}")


def load_latest_checkpoint(run: RunDir | os.PathLike, map_location: str | torch.device = "cpu",
                           *, run_ids: Collection[str] | None = None,
                           accept: Callable[[dict[str, Any]], None] | None = None
                           ) -> dict[str, Any] | None:
    """The newest checkpoint that verifies, belongs to the run and passes `accept`.

    `run_ids`: the ids a checkpoint may record (default: those of the run's config.toml,
    when it has one). `accept(state)` raises ValueError when the state does not fit what
    it will be loaded into (see `check_fits`). None when no checkpoint qualifies.
    """
    run = _as_run(run)
    if run_ids is None and run.has_config():
        run_ids = run_ids_of(run.read_config())
    for step, path in run.list_checkpoints():
        try:
            state = load_verified(run, step, path, map_location, run_ids)
            if accept is not None:
                accept(state)
            return state
        except Exception as exc:  # a damaged or foreign file must not stop the resume
            warnings.warn(f"checkpoint {path} (step {step}) is unusable ({exc}); "
                          "falling back to the previous one", stacklevel=2)
    return None


def load_run_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model of a run directory at its newest valid checkpoint: (model, cfg, step)."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    model = MoELM(cfg.model).to(device)
    state = load_latest_checkpoint(run, map_location=device, run_ids=run_ids_of(cfg),
                                   accept=lambda s: check_fits(model, s["model"]))
    from moe.checkpoint_dcp import load_sharded_model, newest_checkpoint

    newest = newest_checkpoint(run)  # a run trained sharded (FSDP2) has .dcp checkpoints
    if newest is not None and newest[0] == "dcp" and (state is None or
                                                      newest[1] > int(state["step"])):
        load_sharded_model(run, model, newest[1])
        return model.eval(), cfg, newest[1]
    if state is None:
        raise BadInput(f"{run.path} has no loadable checkpoint; train it first with "
                         f"`moe train {run.config_path} --out {run.path}`")
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, int(state["step"])


def check_optimizer_fits(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """ValueError when an optimizer state_dict does not fit `opt` (groups, sizes, shapes)."""
    groups = opt.param_groups
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups) or any(
            len(g["params"]) != len(s.get("params", ())) for g, s in zip(groups, saved_groups,
                                                                         strict=True)):
        raise ValueError("optimizer state has other parameter groups than the model's")
    params = [p for g in groups for p in g["params"]]
    index = [i for s in saved_groups for i in s["params"]]
    for i, param in zip(index, params, strict=True):
        for name, value in saved.get("state", {}).get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(f"optimizer {name} of parameter {i} has shape "
                                 f"{tuple(value.shape)}, the parameter's is {tuple(param.shape)}")

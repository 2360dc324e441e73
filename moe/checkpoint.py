"""Atomic, verifiable, pickle-free checkpoints of a run, and loading a run's model.

`RUN_DIR/checkpoints/step-00000100.pt` holds the model, optimizer, step and
RNG state; it is serialised in memory, written to a temporary name, fsynced and
renamed, and its SHA-256 goes to `step-00000100.sha256` beside it. Loading uses
`torch.load(weights_only=True)`, so a checkpoint can never run pickled code; a
newest checkpoint that is truncated, fails its checksum or does not load is
skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from moe.model import MoELM
from moe.rundir import RunDir


def save_checkpoint(run: RunDir | os.PathLike, step: int, state: dict[str, Any], *,
                    keep: int = 2) -> Path:
    """Write `state` atomically with its checksum, then delete all but the newest `keep`."""
    run = _as_run(run)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = run.write_checkpoint(step, data, hashlib.sha256(data).hexdigest())
    run.prune_checkpoints(keep)
    return path


def _as_run(run: RunDir | os.PathLike) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


def _load_verified(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    data = path.read_bytes()
    digest_path = path.with_suffix(".sha256")
    if digest_path.is_file():
        expected = digest_path.read_text().strip()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError("checksum mismatch")
    state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError("not a training checkpoint")
    return state


def load_latest_checkpoint(run: RunDir | os.PathLike, map_location: str | torch.device = "cpu"
                           ) -> dict[str, Any] | None:
    """The newest checkpoint that loads and verifies; None when there is none."""
    run = _as_run(run)
    for step, path in run.list_checkpoints():
        try:
            return _load_verified(path, map_location)
        except Exception as exc:  # a damaged file must not stop the resume
            warnings.warn(f"checkpoint {path} (step {step}) is unusable ({exc}); "
                          "falling back to the previous one", stacklevel=2)
    return None


def load_run_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model of a run directory at its newest valid checkpoint: (model, cfg, step)."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    state = load_latest_checkpoint(run, map_location=device)
    model = MoELM(cfg.model).to(device)
    from moe.checkpoint_dcp import load_sharded_model, newest_checkpoint

    newest = newest_checkpoint(run)  # a run trained sharded (FSDP2) has .dcp checkpoints
    if newest is not None and newest[0] == "dcp" and (state is None or
                                                      newest[1] > int(state["step"])):
        load_sharded_model(run, model, newest[1])
        return model.eval(), cfg, newest[1]
    if state is None:
        raise ValueError(f"{run.path} has no loadable checkpoint; train it first with "
                         f"`moe train {run.config_path} --out {run.path}`")
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, int(state["step"])

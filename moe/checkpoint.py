"""Atomic, verifiable, pickle-free checkpoints of a run.

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
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from moe.io import atomic_write_bytes, atomic_write_text
from moe.rundir import CHECKPOINTS

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file, newest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write `state` atomically with its checksum, then delete all but the newest `keep`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(run_dir, step)
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")
    for _, old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


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


def load_latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu"
                           ) -> dict[str, Any] | None:
    """The newest checkpoint that loads and verifies; None when there is none."""
    for step, path in list_checkpoints(run_dir):
        try:
            return _load_verified(path, map_location)
        except Exception as exc:  # a damaged file must not stop the resume
            warnings.warn(f"checkpoint {path} (step {step}) is unusable ({exc}); "
                          "falling back to the previous one", stacklevel=2)
    return None

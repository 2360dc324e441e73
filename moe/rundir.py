"""`RunDir`: the one owner of a run directory's files (docs/architecture.md, "Run directory").

```
RUN_DIR/config.toml    the resolved run config (reproduces the run alone)
       /status.json    state (pending|running|done|failed), reason, progress, job ids, attempts
       /metrics.jsonl  one JSON object per logged step
       /checkpoints/   step-NNNNNNNN.pt (+ .sha256), written atomically
       /snapshots/     step-NNNNNNNN.pt weights only, every train.save_every (for `moe merge`)
       /ema/           the EMA weights as a run directory of their own (train.ema_decay > 0)
       /eval.json      task results
       /result.json    one flat record: config keys, counts, final metrics
```

The training loop, the evaluator and the sweep launcher call this class and never
build a run's paths themselves. Its invariants:

- every file is written atomically (temp file, fsync, rename: `moe.io`), so a
  reader never sees half a file;
- status.json, eval.json and result.json are changed by locked read-modify-writes,
  so a launcher and its job never lose each other's fields;
- a resume truncates metrics.jsonl to the checkpoint it resumes from;
- a run is finished exactly when result.json exists.

This module imports no torch: checkpoints are written as bytes here and
(de)serialised by `moe.checkpoint`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from moe.io import (
    append_line,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    update_json,
)

CONFIG = "config.toml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval.json"
SNAPSHOTS = "snapshots"
EMA = "ema"
RESULT = "result.json"

STATES = ("pending", "running", "done", "failed")
_CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")


class RunDir:
    """The files of one run, at `path` (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def status_path(self) -> Path:
        return self.path / STATUS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def eval_path(self) -> Path:
        return self.path / EVAL

    @property
    def result_path(self) -> Path:
        return self.path / RESULT

    # ------------------------------------------------------------------ config

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self):
        """The run's resolved `RunConfig`; ValueError when this is not a run directory."""
        from moe.config import load_config

        if not self.has_config():
            raise ValueError(f"{self.path} is not a run directory (no {CONFIG})")
        return load_config(self.config_path)

    def write_config(self, cfg) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, cfg.to_toml())

    # ------------------------------------------------------------------ status

    def read_status(self) -> dict[str, Any]:
        """status.json as a dict ({} when absent)."""
        return read_json(self.status_path, default={}) or {}

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json under a lock; stamps `updated_at` and `host`."""
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"status state must be one of {STATES}, got {state!r}")
        return self.edit_status(lambda old: {**old, **fields})

    def edit_status(self, fn) -> dict[str, Any]:
        """Locked read-modify-write of status.json with `fn(old) -> new`."""
        def stamped(old: dict[str, Any]) -> dict[str, Any]:
            new = fn(old)
            new["updated_at"] = time.time()
            new.setdefault("host", socket.gethostname())
            return new

        return update_json(self.status_path, stamped)

    # ------------------------------------------------------------------ metrics

    def append_metrics(self, row: dict[str, Any]) -> None:
        append_line(self.metrics_path, json.dumps(row, allow_nan=True))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after `step` (a run that died before its next checkpoint)."""
        rows = self.read_metrics()
        keep = [r for r in rows if r.get("step", 0) <= step]
        if len(keep) != len(rows):
            atomic_write_text(self.metrics_path,
                              "".join(json.dumps(r, allow_nan=True) + "\n" for r in keep))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:08d}.pt"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file, newest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if (m := _CHECKPOINT.match(p.name))]
        return sorted(found, reverse=True)

    def write_checkpoint(self, step: int, data: bytes, digest: str) -> Path:
        """Store checkpoint bytes and their SHA-256, each atomically."""
        path = self.checkpoint_path(step)
        atomic_write_bytes(path, data)
        atomic_write_text(path.with_suffix(".sha256"), digest + "\n")
        return path

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints (and their digests)."""
        for _, old in self.list_checkpoints()[keep:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".sha256").unlink(missing_ok=True)

    # ------------------------------------------------------------------ merge snapshots, EMA

    @property
    def snapshots_dir(self) -> Path:
        return self.path / SNAPSHOTS

    def snapshot_path(self, step: int) -> Path:
        return self.snapshots_dir / f"step-{step:08d}.pt"

    def list_snapshots(self) -> list[tuple[int, Path]]:
        """(step, path) of every weights snapshot kept for merging, oldest first."""
        if not self.snapshots_dir.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.snapshots_dir.iterdir()
                      if (m := _CHECKPOINT.match(p.name)))

    def write_snapshot(self, step: int, data: bytes, digest: str) -> Path:
        """Store snapshot bytes and their SHA-256, each atomically (never pruned)."""
        path = self.snapshot_path(step)
        atomic_write_bytes(path, data)
        atomic_write_text(path.with_suffix(".sha256"), digest + "\n")
        return path

    def ema_run(self) -> RunDir:
        """The EMA weights of this run, stored as a run directory `moe eval` accepts."""
        return RunDir(self.path / EMA)

    # ------------------------------------------------------------------ eval and result

    def is_done(self) -> bool:
        """A run is finished when its result.json exists."""
        return self.result_path.is_file()

    def read_result(self) -> dict[str, Any] | None:
        return read_json(self.result_path)

    def write_result(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.result_path, record)

    def read_eval(self) -> dict[str, Any]:
        return read_json(self.eval_path, default={}) or {}

    def merge_eval(self, results: dict[str, dict[str, Any]], flat: dict[str, Any],
                   step: int | None = None) -> Path:
        """Merge task results into eval.json, and their flat columns into result.json if the
        run is finished (a finished run gains the columns of newly evaluated tasks)."""
        record = {"tasks": results, **({} if step is None else {"step": step})}
        update_json(self.eval_path,
                    lambda old: {**old, **record, "tasks": {**old.get("tasks", {}), **results}})
        if self.is_done():
            update_json(self.result_path, lambda old: {**old, **flat})
        return self.eval_path


# Module-level helpers for callers that hold a plain path (the sweep launcher's loops).

def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    return RunDir(run_dir).read_status()


def update_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    return RunDir(run_dir).update_status(**fields)


def is_done(run_dir: str | os.PathLike) -> bool:
    return RunDir(run_dir).is_done()


RECIPES = "recipes"


def recipe_dirs(sweep_dir: str | os.PathLike) -> list[RunDir]:
    """SWEEP_DIR/recipes/*/: outputs of `moe merge` and `moe ensemble` kept beside a sweep's
    runs (apart from runs/, so they never enter the sweep's own fits)."""
    root = Path(sweep_dir) / RECIPES
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if (p / RESULT).is_file()]

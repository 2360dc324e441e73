"""The run directory contract (DESIGN.md, "Sweep directory contract").

```
RUN_DIR/config.toml    the resolved run config (reproduces the run alone)
       /status.json    state (pending|running|done|failed), reason, progress, job ids, attempts
       /metrics.jsonl  one JSON object per logged step
       /checkpoints/   step-NNNNNNNN.pt, written atomically
       /eval.json      task results
       /result.json    one flat record: config keys, counts, final metrics
```

Both the training job and the sweep launcher update status.json; they do so
through `update_status`, a locked read-modify-write, so neither loses the
other's fields.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from moe.io import read_json, update_json

CONFIG = "config.toml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval.json"
RESULT = "result.json"

STATES = ("pending", "running", "done", "failed")


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """status.json as a dict ({} when absent)."""
    return read_json(Path(run_dir) / STATUS, default={}) or {}


def update_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json under a lock; stamps `updated_at`."""
    state = fields.get("state")
    if state is not None and state not in STATES:
        raise ValueError(f"status state must be one of {STATES}, got {state!r}")

    def merge(old: dict[str, Any]) -> dict[str, Any]:
        old.update(fields)
        old["updated_at"] = time.time()
        old.setdefault("host", socket.gethostname())
        return old

    return update_json(Path(run_dir) / STATUS, merge)


def is_done(run_dir: str | os.PathLike) -> bool:
    """A run is finished when its result.json exists."""
    return (Path(run_dir) / RESULT).is_file()

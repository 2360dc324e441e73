"""The run id: a short hash of what determines a run's trained weights.

A sweep names each run directory by it, so relaunching a spec finds its runs
again. Only fields that change the trained weights count; evaluation, logging,
checkpoint cadence, thread counts, device choice and the experts kernel backend
do not, so adding a task to a finished sweep evaluates its runs and trains nothing.
A section added later (parallelism, tracking) is outside the hash unless listed in
`HASHED_SECTIONS`; a new field of a hashed section is inside it unless listed in
`NOT_HASHED` (the safe default: a new training option makes a new run).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from moe.config.schema import RunConfig

HASHED_SECTIONS = ("model", "train", "data")
NOT_HASHED: dict[str, frozenset[str]] = {
    "model": frozenset({"experts_backend"}),
    "train": frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "device",
                        "num_threads"}),
    "data": frozenset(),
}
NOT_HASHED["train"] = NOT_HASHED["train"] | {"save_every"}
# Fields added after runs were launched count only when set, so those runs keep their ids.
HASHED_UNLESS_DEFAULT: dict[str, dict[str, Any]] = {
    "train": {"ema_decay": 0.0, "ema_start": 0, "min_lr_frac": None},
    "data": {"order": "shuffled", "pocket_noise": 0.0, "unique_tokens": 0},
}


def weight_fields(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The config fields that determine the trained weights, by section."""
    full = cfg.to_dict()
    return {s: {k: v for k, v in full[s].items() if k not in NOT_HASHED[s]
                and not (k in HASHED_UNLESS_DEFAULT.get(s, {})
                         and v == HASHED_UNLESS_DEFAULT[s][k])}
            for s in HASHED_SECTIONS}


def config_hash(cfg: RunConfig, length: int = 10) -> str:
    """Short content hash of the weight-determining fields: a sweep's run id."""
    return _digest(weight_fields(cfg), length)


def legacy_config_hash(cfg: RunConfig, length: int = 10) -> str:
    """Version 0.1's run id (a hash of every field), to find sweep runs launched by it."""
    return _digest(cfg.to_dict(), length)


def _digest(obj: Any, length: int) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]

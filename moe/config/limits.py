"""Upper bounds of every numeric config value, checked when a `RunConfig` is built.

The section dataclasses check signs, choices and relations between fields; these
caps reject values no run can use (a 10^20-layer model, a billion-sequence batch,
5000 threads) with a one-line error before anything is allocated or written. The
caps are far above anything trained today (the paper's largest model is 16 layers
of d_model 2048 with 256 experts). Every float must also be finite. Whether a run
that passes fits the machine is decided by `moe.train.resources.check_resources`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moe.config.errors import ConfigError

MAX_INT = 2**63 - 1

LIMITS: dict[str, dict[str, float]] = {
    "model": {"d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
              "n_experts": 1 << 14, "top_k": 1 << 14, "ffn_mult": 64, "vocab_size": 1 << 24,
              "seq_len": 1 << 20, "rope_theta": 1e12, "norm_eps": 1.0, "init_std": 10.0},
    "train": {"tokens": 10**16, "tpp": 1e6, "batch_size": 1 << 20, "grad_accum": 1 << 20,
              "warmup_steps": 10**10, "checkpoint_every": 10**10, "keep_checkpoints": 10**4,
              "log_every": 10**10, "num_threads": 4096, "seed": MAX_INT},
    "data": {"val_batches": 10**6, "pocket_seed": MAX_INT, "pocket_entities": 10**7,
             "pocket_attributes": 10**3, "pocket_fact_repeats": 10**4,
             "pocket_arith_problems": 10**8, "pocket_arith_steps": 100,
             "pocket_arith_max": 10**12, "pocket_eval_items": 10**7},
    "eval": {"every": 10**10, "max_items": 10**9, "n_shots": 1000, "batch_size": 1 << 20},
    "log": {"progress_every_s": 10**7},
}
"""Largest accepted value of a field, by section (fields not listed: finite only)."""
NONNEGATIVE = {("train", "seed"), ("data", "pocket_seed")}
"""Fields the sampling code (numpy SeedSequence) needs >= 0."""


def check_limits(cfg: Any) -> None:
    """ConfigError naming the first field of `cfg` (a RunConfig) outside its bounds."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        caps = LIMITS.get(section.name, {})
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            key = f"{section.name}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number")
            hi = caps.get(f.name)
            if hi is not None and value > hi:
                cap = int(hi) if float(hi).is_integer() else hi
                raise ConfigError(f"{key}={value} is above the largest accepted value "
                                  f"{cap}; check for a typo")
            if (section.name, f.name) in NONNEGATIVE and value < 0:
                raise ConfigError(f"{key}={value} must be >= 0")

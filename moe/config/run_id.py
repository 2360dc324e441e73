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
LEGACY_FIELDS: dict[str, tuple[str, ...]] = {  # version 0.1's config, section by section
    "model": ("d_model", "n_layers", "n_heads", "n_kv_heads", "n_experts", "top_k", "ffn_mult",
              "vocab_size", "seq_len", "experts_backend", "tie_embeddings", "norm_topk_prob",
              "rope_theta", "norm_eps", "init_std"),
    "train": ("tokens", "tpp", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
              "schedule", "decay_frac", "weight_decay", "beta1", "beta2", "grad_clip",
              "aux_loss_coef", "z_loss_coef", "seed", "checkpoint_every", "keep_checkpoints",
              "log_every", "precision", "device", "num_threads"),
    "data": ("source", "val_fraction", "val_batches", "pocket_seed", "pocket_entities",
             "pocket_attributes", "pocket_fact_repeats", "pocket_arith_problems",
             "pocket_arith_steps", "pocket_arith_max", "pocket_eval_items"),
    "eval": ("tasks", "every", "max_items", "n_shots", "batch_size", "accuracy"),
}
"""Version 0.1's sections: sections added later never change its hash."""
NOT_HASHED: dict[str, frozenset[str]] = {
    "model": frozenset({"experts_backend"}),
    "train": frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "device",
                        "num_threads", "save_every", "compile"}),
    "data": frozenset(),
}
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


# Fields added after 0.1: left out of its id, so 0.1's runs are still found.
def legacy_config_hash(cfg: RunConfig, length: int = 10) -> str:
    """Version 0.1's run id: a hash of every field version 0.1 had (`LEGACY_FIELDS`), to find
    the sweep runs it launched. Fields and sections added since do not enter it."""
    full = cfg.to_dict()
    return _digest({s: {k: full[s][k] for k in names} for s, names in LEGACY_FIELDS.items()},
                   length)


def _digest(obj: Any, length: int) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]

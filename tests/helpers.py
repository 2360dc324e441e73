"""Small configurations shared by the tests."""

from moe.config import RunConfig, apply_overrides

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_experts=4",
    "model.top_k=2", "model.seq_len=32", "train.tokens=8192", "train.batch_size=8",
    "train.warmup_steps=4", "train.checkpoint_every=8", "train.log_every=4",
    "train.num_threads=1", "data.pocket_entities=40", "data.pocket_arith_problems=300",
    "data.pocket_eval_items=20", "eval.tasks=[]",
]


def tiny_config(*overrides: str) -> RunConfig:
    """A run that trains in about a second on one core (32 steps of 8 x 32 tokens)."""
    return apply_overrides(RunConfig(), [*TINY, *overrides])


def stale_file(path, age_s: float):
    """A leftover temporary file `age_s` seconds old (as an interrupted atomic write leaves)."""
    import os
    import time

    path.write_text("partial")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path

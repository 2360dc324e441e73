"""Resuming a run (`moe.train.resume`): the result is bit-equal to an uninterrupted run's."""

from __future__ import annotations

from helpers import tiny_config
from moe.rundir import RunDir
from moe.train import train_run


def test_train_loss_is_bit_equal_after_a_late_resume(tmp_path):
    cfg = tiny_config("train.checkpoint_every=8")  # 32 steps; train_loss averages 20
    straight = train_run(cfg, tmp_path / "straight")
    late = RunDir(tmp_path / "late")
    train_run(cfg, late.path)
    # a run killed after its step-24 checkpoint: no step-32 checkpoint, no result
    late.result_path.unlink()
    late.checkpoint_path(32).unlink()
    late.checkpoint_path(32).with_suffix(".sha256").unlink()
    resumed = train_run(cfg, late.path)
    assert resumed["train_loss"] == straight["train_loss"]
    assert resumed["val_loss"] == straight["val_loss"]

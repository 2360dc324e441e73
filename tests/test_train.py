"""The training job: it learns, resumes bit-identically after kill -9, survives a corrupt
checkpoint, and reports divergence."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from helpers import tiny_config
from moe.checkpoint import load_latest_checkpoint
from moe.config import TrainConfig
from moe.io import read_jsonl
from moe.rundir import RunDir, read_status
from moe.train import TrainingFailed, lr_at, train_run


def _weights(run_dir):
    return load_latest_checkpoint(run_dir)["model"]


def test_trains_and_writes_the_run_directory(tmp_path):
    cfg = tiny_config("train.tokens=32768", "train.lr=5e-3")
    result = train_run(cfg, tmp_path)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert {"step", "tokens", "loss", "ce", "lb", "z", "lr", "grad_norm", "tokens_per_s",
            "max_over_mean_load"} <= set(rows[0])
    assert len(rows[0]["max_over_mean_load"]) == cfg.model.n_layers
    assert read_status(tmp_path)["state"] == "done"
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["run_id"] == result["run_id"] and saved["tokens"] == 32768
    for key in ("n_params_total", "n_params_active", "flops", "train_loss", "val_loss", "sparsity",
                "model.d_model", "train.lr"):
        assert key in saved
    assert (tmp_path / "config.toml").is_file()
    # a finished run is not trained again
    assert train_run(cfg, tmp_path) == saved


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    overrides = ["--set", "train.tokens=65536", "--set", "train.checkpoint_every=8"]
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(tiny_config().to_toml())
    cmd = [sys.executable, "-m", "moe.app.cli", "train", str(cfg_path), "--quiet", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    subprocess.run([*cmd, "--out", str(tmp_path / "straight")], check=True, env=env,
                   timeout=300, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not RunDir(killed).list_checkpoints() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    step_at_kill = RunDir(killed).list_checkpoints()[0][0]
    assert step_at_kill < 64

    subprocess.run([*cmd, "--out", str(killed)], check=True, env=env, timeout=300,
                   capture_output=True)
    a = json.loads((tmp_path / "straight" / "result.json").read_text())
    b = json.loads((killed / "result.json").read_text())
    assert a["val_loss"] == b["val_loss"]
    for name, tensor in _weights(tmp_path / "straight").items():
        assert torch.equal(tensor, _weights(killed)[name]), name
    steps = [r["step"] for r in read_jsonl(killed / "metrics.jsonl")]
    assert steps == sorted(set(steps)), "metrics after the last checkpoint were logged twice"


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    cfg = tiny_config("train.checkpoint_every=8", "train.keep_checkpoints=3")
    train_run(cfg, tmp_path)
    (newest_step, newest), (prev_step, _) = RunDir(tmp_path).list_checkpoints()[:2]
    reference = _weights(tmp_path)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="unusable"):
        assert load_latest_checkpoint(tmp_path)["step"] == prev_step
    # resuming from the previous checkpoint reproduces the lost one exactly
    (tmp_path / "result.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_run(cfg, tmp_path)
    state = load_latest_checkpoint(tmp_path)
    assert state["step"] == newest_step
    for name, tensor in reference.items():
        assert torch.equal(tensor, state["model"][name])


def test_divergence_marks_the_run_failed(tmp_path):
    with pytest.raises(TrainingFailed, match="diverged"):
        train_run(tiny_config("train.lr=1e20", "train.min_lr=0"), tmp_path)
    status = read_status(tmp_path)
    assert status["state"] == "failed" and "non-finite" in status["reason"]
    assert status["step"] >= 1
    assert not (tmp_path / "result.json").exists()


def test_other_config_in_same_directory_is_refused(tmp_path):
    train_run(tiny_config("train.tokens=2048"), tmp_path)
    (tmp_path / "result.json").unlink()
    with pytest.raises(ValueError, match="different run"):
        train_run(tiny_config("train.tokens=2048", "train.seed=5"), tmp_path)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    t = TrainConfig(tpp=1.0, lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule,
                    decay_frac=0.2)
    lrs = [lr_at(s, t, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] == pytest.approx(0.1)
    if schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[81] < 1.0


def test_bad_task_or_data_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown task|no-such-task"):
        train_run(tiny_config('eval.tasks=["no-such-task"]'), tmp_path / "a")
    with pytest.raises(ValueError, match="shard directory"):
        train_run(tiny_config(f"data.source={tmp_path / 'nowhere'}"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

"""Issue 14, item 3 (one writer per run directory) and the late-failure half of item 5:
a second trainer of a directory is refused naming the holder's PID; a finished directory
asked for another run is an error; a config that never trained does not block the rerun;
a failure once the directory holds the run marks it failed with the reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import tiny_config
from moe.app.cli import main
from moe.rundir import RunDir, RunLocked
from moe.train import train_run


@pytest.mark.slow  # two processes that import torch: about 8 s on 2 busy cores
def test_second_trainer_of_a_directory_is_refused_naming_the_holder(tmp_path, capsys):
    cfg_path = tmp_path / "long.toml"
    cfg_path.write_text(tiny_config("train.tokens=100000000").to_toml())
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "moe.app.cli", "train", str(cfg_path),
                              "--quiet", "--out", str(run_dir)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while RunDir(run_dir).read_status().get("state") != "running":
            assert time.time() < deadline and first.poll() is None, "first trainer never ran"
            time.sleep(0.05)
        code = main(["train", str(cfg_path), "--quiet", "--out", str(run_dir)])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.count("\n") == 0 and f"being trained by process {first.pid}" in err
        assert first.poll() is None, "the first trainer must be left alone"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the OS drops the lock with its holder: a killed trainer never blocks the next one
    with RunDir(run_dir).writer_lock():
        pass


def test_lock_is_exclusive_within_a_process_too(tmp_path):
    run = RunDir(tmp_path)
    with run.writer_lock():
        with pytest.raises(RunLocked, match=f"process {os.getpid()}"):
            train_run(tiny_config(), tmp_path)


def test_finished_directory_with_another_run_is_an_error(tmp_path):
    """config.toml replaced by hand (or by a tool) under a finished result: the old result
    must not be returned as the new run's."""
    train_run(tiny_config("train.tokens=2048"), tmp_path)
    other = tiny_config("train.tokens=2048", "train.seed=7")
    RunDir(tmp_path).write_config(other)
    with pytest.raises(ValueError, match="holds the finished run"):
        train_run(other, tmp_path)


def test_config_that_never_trained_does_not_block_the_rerun(tmp_path):
    """What a run refused at once (a typo'd huge d_model) leaves must not block the fix."""
    RunDir(tmp_path).write_config(tiny_config("model.d_model=8192"))
    result = train_run(tiny_config("train.tokens=2048"), tmp_path)
    assert result["d_model"] == 32 and RunDir(tmp_path).read_config().model.d_model == 32


def test_failure_after_the_directory_exists_marks_the_run_failed(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero in validation")

    monkeypatch.setattr("moe.train.loop.validation_loss", broken)
    with pytest.raises(ZeroDivisionError):
        train_run(tiny_config("train.tokens=2048"), tmp_path)
    status = RunDir(tmp_path).read_status()
    assert status["state"] == "failed"
    assert status["reason"] == "ZeroDivisionError: division by zero in validation"


def test_interrupt_marks_the_run_failed(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moe.train.loop.validation_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny_config("train.tokens=2048"), tmp_path)
    assert RunDir(tmp_path).read_status()["state"] == "failed"

"""`moe.rundir.RunDir`, the owner of a run directory's files: one writer per directory (a
second trainer is refused naming the holder's PID), a finished directory asked for another
run is an error, a config that never trained does not block the rerun, a failure once the
directory holds the run marks it failed with the reason, a torn metrics line does not
swallow the next row, and stale temporary files are cleaned when a run starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import stale_file, tiny_config
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
        assert code == 69  # a missing resource: the run is held by another process
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


def test_torn_last_metrics_line_does_not_swallow_the_next_row(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": 1.0})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4, "loss": 0.9')  # the crash hit mid-line
    run.truncate_metrics(3)  # the resume from the step-3 checkpoint
    run.append_metrics({"step": 4, "loss": 0.5})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]
    assert run.metrics_path.read_text().endswith('"loss": 0.5}\n')


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 2, "lo')
    run.append_metrics({"step": 3})  # no truncate: e.g. a periodic-eval row
    assert [r["step"] for r in run.read_metrics()] == [1, 3]


def test_stale_temporary_files_are_cleaned_when_a_run_starts(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints_dir.mkdir(parents=True)
    old = [stale_file(tmp_path / ".status.json.abc.tmp", 7200),
           stale_file(run.checkpoints_dir / ".step-00000008.pt.xyz.tmp", 7200)]
    fresh = stale_file(tmp_path / ".result.json.new.tmp", 10)  # may be a live writer's
    train_run(tiny_config("train.tokens=2048"), tmp_path)
    assert not any(p.exists() for p in old) and fresh.exists()

"""`moe.train.signals`: SIGTERM and SIGHUP end a run like Ctrl-C, after a checkpoint, and a
rerun resumes from it. The reference for the exit codes is the shell's convention
(128 + the signal number: 143 for SIGTERM, 129 for SIGHUP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import tiny_config
from moe.rundir import RunDir
from moe.train import train_run
from moe.train.signals import StopSignals, Terminated

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


@pytest.fixture
def default_dispositions():
    """SIGTERM and SIGHUP at their default action, as in a shell (pytest may inherit an
    ignored SIGHUP from nohup)."""
    old = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in old.items():
        signal.signal(s, handler)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.slow  # a real `moe train` process (about 10 s on 2 busy cores): the real signal
def test_sigterm_to_moe_train_checkpoints_marks_failed_exits_143_and_resumes(tmp_path):
    cfg = tiny_config("train.tokens=16384", "train.checkpoint_every=100000",
                      "log.progress_every_s=0.2")  # 64 steps
    (tmp_path / "tiny.toml").write_text(cfg.to_toml())
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "moe", "train", str(tmp_path / "tiny.toml"),
                             "--out", str(run.path)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(run.read_metrics()) >= 2 or proc.poll() is not None, 120,
                  "training did not start")  # rows at step 1 and 4 (train.log_every)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    status = run.read_status()
    assert status["state"] == "failed" and "SIGTERM" in status["reason"], status
    (step, _), = run.list_checkpoints()  # the one the signal wrote (no periodic one yet)
    assert 4 <= step < 64 and run.is_verified(run.checkpoint_path(step))
    assert f"stopped by SIGTERM after the checkpoint at step {step}" in err
    lines = [x for x in err.splitlines() if x.startswith("progress: step ")]
    assert lines and "tokens/s" in lines[0] and "ETA" in lines[0]  # stderr is a pipe, no TTY
    resumed = train_run(cfg, run.path)  # continues from that checkpoint
    assert resumed["steps"] == 64 and run.read_status()["state"] == "done"
    rows = [r["step"] for r in run.read_metrics() if "loss" in r]
    assert rows == [1, *range(4, 65, 4)]  # every logged step once, across the stop


def test_sighup_stops_at_the_step_boundary_and_the_resumed_run_is_bit_identical(
        tmp_path, monkeypatch, default_dispositions):
    import moe.train.loop as loop

    cfg = tiny_config("train.checkpoint_every=100")  # 32 steps: no periodic checkpoint
    reference = train_run(cfg, tmp_path / "reference")
    real_step = loop.train_step

    def hang_up_during_step_10(model, opt, data, cfg_, step, *args, **kwargs):
        if step == 9:
            os.kill(os.getpid(), signal.SIGHUP)  # arrives in the middle of the step
        return real_step(model, opt, data, cfg_, step, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", hang_up_during_step_10)
    run = RunDir(tmp_path / "run")
    with pytest.raises(Terminated) as stopped:
        train_run(cfg, run.path)
    assert stopped.value.exit_code == 129  # 128 + SIGHUP (1)
    assert [s for s, _ in run.list_checkpoints()] == [10]  # the step ended, then a checkpoint
    assert run.read_status()["reason"] == "stopped by SIGHUP after the checkpoint at step 10; " \
                                          "rerun to resume"
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train_run(cfg, run.path)
    assert resumed["val_loss"] == reference["val_loss"]
    assert resumed["train_loss"] == reference["train_loss"]


def test_handlers_of_others_are_left_alone(default_dispositions):
    def submitits(signum, frame):  # submitit ignores SIGTERM (SLURM sends it on a requeue)
        pass

    signal.signal(signal.SIGTERM, submitits)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
    with StopSignals() as stops:
        assert signal.getsignal(signal.SIGTERM) is submitits
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert not stops.active and stops.poll(world=1) is None


def test_outside_the_loop_or_a_second_signal_stops_at_once(default_dispositions):
    with StopSignals() as stops:
        with pytest.raises(Terminated, match="stopped by SIGTERM; rerun"):
            os.kill(os.getpid(), signal.SIGTERM)  # setup or final evaluation: no loop
        stops.in_loop = True
        os.kill(os.getpid(), signal.SIGTERM)  # the loop: wait for the boundary
        assert stops.poll(world=1) == signal.SIGTERM
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGHUP)  # a second signal: now


def test_terminated_status_reason_and_exit_codes_follow_the_shell():
    assert Terminated(signal.SIGTERM).exit_code == 143
    assert Terminated(signal.SIGHUP).exit_code == 129
    assert json.dumps(str(Terminated(signal.SIGTERM, step=7))) == \
        '"stopped by SIGTERM after the checkpoint at step 7; rerun to resume"'

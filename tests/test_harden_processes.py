"""Issue 14, item 8: a reused PID does not make a dead run look alive; a torn metrics line
does not swallow the next row; stale temporary files are cleaned; SIGTERM to the local
launcher stops its workers; `--max-parallel 0` is refused before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import fakeslurm
import pytest

from helpers import tiny_config
from moe.procs import process_start_time
from moe.rundir import RunDir
from moe.sweeps import launch
from moe.sweeps.launch import LaunchError
from moe.sweeps.scheduler import LOCAL_ALIVE, LOCAL_GONE, job_states, local_job_id
from moe.train import train_run


def test_a_reused_pid_is_not_the_recorded_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        recorded = local_job_id(child.pid)
        assert job_states([recorded]) == {recorded: LOCAL_ALIVE}
        # the same record, had the OS given that PID to another live process (this one)
        reused = recorded.replace(f":{child.pid}:", f":{os.getpid()}:")
        assert reused != recorded
        assert job_states([reused]) == {reused: LOCAL_GONE}
    finally:
        child.kill()
        child.wait()
    assert job_states([recorded]) == {recorded: LOCAL_GONE}


def test_start_time_is_field_22_of_proc_stat():
    fields = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()
    assert process_start_time(os.getpid()) == int(fields[19])  # field 22 = index 19 after ')'


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


def _stale(path, age_s: float):
    path.write_text("partial")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_stale_temporary_files_are_cleaned_when_a_run_starts(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints_dir.mkdir(parents=True)
    old = [_stale(tmp_path / ".status.json.abc.tmp", 7200),
           _stale(run.checkpoints_dir / ".step-00000008.pt.xyz.tmp", 7200)]
    fresh = _stale(tmp_path / ".result.json.new.tmp", 10)  # may be a live writer's
    train_run(tiny_config("train.tokens=2048"), tmp_path)
    assert not any(p.exists() for p in old) and fresh.exists()


def test_stale_temporary_files_are_cleaned_at_launch(tmp_path, monkeypatch):
    fakeslurm.install(tmp_path, monkeypatch)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    old = _stale(sweep / ".results.parquet.abc.tmp", 7200)
    launch(fakeslurm.two_run_spec(), sweep, executor="slurm", progress=False)
    assert not old.exists()


LAUNCHER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import moe.sweeps.local as local
    # a worker that would run for a minute (the real one imports torch and trains)
    local.worker_command = lambda d: [sys.executable, "-c", "import time; time.sleep(60)"]
    local.run_local([Path(sys.argv[1])], max_parallel=1, progress=False)
""")


def test_sigterm_to_the_local_launcher_stops_its_workers(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config(tiny_config("train.tokens=100000000"))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(run.path)],
                                stderr=subprocess.PIPE)
    worker_pid = None
    try:
        deadline = time.time() + 60
        while not run.read_status().get("job_ids"):
            assert time.time() < deadline and launcher.poll() is None, "no worker started"
            time.sleep(0.05)
        worker_pid = int(run.read_status()["job_ids"][-1].split(":")[2])
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        assert not _alive(worker_pid), "the worker outlived its launcher"
        status = run.read_status()
        assert status["state"] == "failed" and "launcher interrupted" in status["reason"]
    finally:
        for pid in (launcher.pid, worker_pid):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


def _alive(pid: int) -> bool:
    deadline = time.time() + 5  # a terminated process may take a moment to go
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("n", [0, -1])
def test_max_parallel_below_one_is_refused_before_anything_is_written(tmp_path, n):
    sweep = tmp_path / "sweep"
    with pytest.raises(LaunchError, match=f"--max-parallel {n} must be at least 1"):
        launch(fakeslurm.two_run_spec(), sweep, executor="local", max_parallel=n)
    assert not sweep.exists()


def test_cli_refuses_max_parallel_zero_in_one_line(tmp_path, capsys):
    from moe.app.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text(fakeslurm.two_run_spec().to_toml())
    assert main(["sweep", "launch", str(spec), "--dir", str(tmp_path / "d"),
                 "--max-parallel", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "d").exists()

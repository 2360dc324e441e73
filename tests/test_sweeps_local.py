"""The `local` executor (`moe.sweeps.local`): SIGTERM to the launcher stops its workers,
and `--max-parallel 0` is refused before anything is written."""

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
from moe.rundir import RunDir
from moe.sweeps import launch
from moe.sweeps.launch import LaunchError

LAUNCHER = textwrap.dedent("""
    import sys
    import moe.sweeps.local as local
    from moe.rundir import RunDir
    if sys.argv[2] == "exec":  # a worker that would run for a minute
        local.worker_command = lambda d: [sys.executable, "-c", "import time; time.sleep(60)"]
    local.run_local([RunDir(sys.argv[1])], max_parallel=1, progress=False)
""")


@pytest.mark.parametrize("workers", ["exec", "fork"])
def test_sigterm_to_the_local_launcher_stops_its_workers(tmp_path, workers):
    """exec: a sleeping stand-in worker; fork: the real job, forked from the server that
    preloaded torch, training a run far too long to finish."""
    run = RunDir(tmp_path / "run")
    run.write_config(tiny_config("train.tokens=100000000"))
    env = {**os.environ, "MOE_LOCAL_WORKERS": workers}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(run.path), workers],
                                stderr=subprocess.PIPE, env=env)
    worker_pid = None
    try:
        deadline = time.time() + 60
        while not run.read_status().get("job_ids"):
            assert time.time() < deadline and launcher.poll() is None, "no worker started"
            time.sleep(0.05)
        worker_pid = int(run.read_status()["job_ids"][-1].split(":")[2])
        if workers == "fork":  # the worker is training: a forked child, not an exec'd one
            while run.read_status().get("state") != "running":
                assert time.time() < deadline and launcher.poll() is None, "never trained"
                time.sleep(0.05)
            assert "forkserver" in _cmdline(_parent(worker_pid))
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


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


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


def test_an_unknown_worker_mode_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_WORKERS", "thread")
    sweep = tmp_path / "sweep"
    with pytest.raises(LaunchError, match="MOE_LOCAL_WORKERS='thread': use fork or exec"):
        launch(fakeslurm.two_run_spec(), sweep, executor="local", max_parallel=1)
    assert not sweep.exists()


def test_runs_start_longest_first_and_unplanned_ones_last():
    from types import SimpleNamespace

    from moe.sweeps.local import longest_first

    runs = [RunDir(f"/x/{name}") for name in ("a", "b", "c", "d", "e")]
    plans = {"a": SimpleNamespace(flops=1e9), "b": SimpleNamespace(flops=5e9),
             "d": SimpleNamespace(flops=1e9), "e": SimpleNamespace(flops=2e9)}
    # by FLOPs, largest first; a and d tie and keep their order; c has no plan
    assert [r.name for r in longest_first(runs, plans)] == ["b", "e", "a", "d", "c"]


UNGUARDED = textwrap.dedent("""
    import sys
    from helpers import tiny_config
    from moe.rundir import RunDir
    from moe.sweeps.local import run_local
    with open(sys.argv[1] + "/top-level-ran", "a") as f:  # no __main__ guard: runs on import
        f.write("x")
    run = RunDir(sys.argv[1] + "/run")
    run.write_config(tiny_config())
    print(run_local([run], max_parallel=1, progress=False))
""")


@pytest.mark.parametrize("launcher", ["script", "stdin"])
def test_forked_workers_never_rerun_the_launchers_main(tmp_path, launcher):
    """multiprocessing's forkserver children re-import the parent's main script unless told
    not to: a launcher read from stdin failed ("No such file '<stdin>'"), and a script
    without an `if __name__ == "__main__":` guard ran its top level again in the worker,
    which then failed its run ("An attempt has been made to start a new process before the
    current process has finished its bootstrapping phase")."""
    script = tmp_path / "launch.py"
    script.write_text(UNGUARDED)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "MOE_LOCAL_WORKERS": "fork",
           "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    if launcher == "script":
        out = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                             capture_output=True, text=True, timeout=300)
    else:
        out = subprocess.run([sys.executable, "-", str(tmp_path)], input=UNGUARDED, env=env,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "{'run': 'done'}" in out.stdout, out.stderr
    assert (tmp_path / "top-level-ran").read_text() == "x"

"""A run file that cannot be parsed is reported for that run (state `unreadable`, with the
reason) while `moe sweep status`, collect and launch go on with every other run."""

from __future__ import annotations

import json

import fakeslurm
import pandas as pd

from helpers import tiny_config
from moe.app.cli import main
from moe.rundir import RunDir
from moe.sweeps import collect, launch, status
from moe.sweeps.profile import ClusterProfile

DEEP = "[" * 200_000 + "]" * 200_000  # valid JSON the parser cannot handle (RecursionError)




def _sweep_with(tmp_path, files: dict[str, dict[str, str]]):
    """A sweep directory with runs/<id>/config.toml plus the given files per run."""
    for run_id, contents in files.items():
        run = RunDir(tmp_path / "runs" / run_id)
        run.write_config(tiny_config())
        for name, text in contents.items():
            (run.path / name).write_text(text)
    return tmp_path


GOOD = json.dumps({"run_id": "good", "d_model": 32, "n_layers": 2, "n_experts": 4,
                   "top_k": 2, "train_loss": 1.5, "val_loss": 1.6})


def test_collect_reports_a_result_too_deep_to_parse_and_keeps_the_rest(tmp_path):
    sweep = _sweep_with(tmp_path, {"good": {"result.json": GOOD}, "deep": {"result.json": DEEP}})
    result = collect(sweep, tmp_path / "table.csv")
    assert list(pd.read_csv(result.path)["run_id"]) == ["good"]
    assert result.skipped == (("deep", "malformed result.json: nested too deeply to parse"),)


def test_status_reports_damaged_files_as_unreadable(tmp_path, capsys):
    sweep = _sweep_with(tmp_path, {
        "good": {"result.json": GOOD},
        "torn": {"status.json": '{"state": "runn'},
        "deep": {"result.json": DEEP},
        "list": {"status.json": "[1, 2]"},
    })
    by_id = {r.run_id: r for r in status(sweep)}
    assert by_id["good"].state == "done"
    for bad in ("torn", "deep", "list"):
        assert by_id[bad].state == "unreadable", bad
    assert "status.json is unreadable" in by_id["torn"].reason
    assert "result.json is unreadable: nested too deeply" in by_id["deep"].reason
    assert main(["sweep", "status", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 0 pending, 0 running, 1 done, 0 failed, 3 unreadable" in out


def test_launch_skips_a_run_with_a_damaged_status_and_submits_the_rest(tmp_path, monkeypatch):
    kept = fakeslurm.install(tmp_path, monkeypatch)
    spec, sweep = fakeslurm.two_run_spec(), tmp_path / "sweep"
    first = launch(spec, sweep, executor="slurm", profile=ClusterProfile(), progress=False)
    damaged, other = sorted(first.submitted)
    (sweep / "runs" / damaged / "status.json").write_text('{"state": "pend')
    # the stub scheduler forgets every job: both runs would be resubmitted
    again = launch(spec, sweep, executor="slurm", profile=ClusterProfile(), progress=False)
    assert again.submitted == (other,)
    ((run_id, reason),) = again.unreadable
    assert run_id == damaged and "status.json is unreadable" in reason
    assert len(fakeslurm.scripts(kept)) == 2


_WRITER = """
import sys, time
from moe.rundir import RunDir
run = RunDir(sys.argv[1])
with run.writer_lock():
    run.update_status(state="running", step=3)
    print("training", flush=True)
    time.sleep(120)
"""


def test_a_run_whose_process_was_killed_is_failed_not_running(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    sweep = _sweep_with(tmp_path, {"alive": {}, "killed": {}})
    writers = {name: subprocess.Popen([sys.executable, "-c", _WRITER,
                                       str(tmp_path / "runs" / name)],
                                      stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
               for name in ("alive", "killed")}
    try:
        for proc in writers.values():
            assert proc.stdout.readline() == "training\n"
        writers["killed"].send_signal(signal.SIGKILL)  # no handler runs: status says running
        writers["killed"].wait(timeout=30)
        assert RunDir(tmp_path / "runs" / "killed").read_status()["state"] == "running"
        by_id = {r.run_id: r for r in status(sweep)}
        assert by_id["alive"].state == "running"
        assert by_id["killed"].state == "failed"
        assert str(writers["killed"].pid) in by_id["killed"].reason
    finally:
        for proc in writers.values():
            proc.kill()
            proc.wait()

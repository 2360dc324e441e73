"""Launching, relaunching, status and collect with the local and debug executors (CPU)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import fakeslurm
import pandas as pd
import pytest

from helpers import stale_file
from moe.app.sweep_cmd import register
from moe.io import atomic_write_json, file_lock
from moe.rundir import RunDir, read_status, update_status
from moe.sweepdir import SweepDir
from moe.sweeps import collect, launch, plan, status
from moe.sweeps.launch import LaunchError
from moe.sweeps.local import Display
from moe.sweeps.records import record_requeue, record_submission
from moe.sweeps.spec import spec_from_dict
from moe.sweeps.status import format_status

TINY_BASE = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
    "train": {"batch_size": 4, "num_threads": 1, "warmup_steps": 2, "checkpoint_every": 4,
              "log_every": 2},
    "data": {"pocket_entities": 20, "pocket_arith_problems": 50, "pocket_eval_items": 10},
}


def tiny_spec(*extra_grids, tokens=1024, grid=None):
    grids = [grid or {"model.n_experts": [1, 4], "model.top_k": [1, 2]}, *extra_grids]
    return spec_from_dict({"name": "tiny", "base": TINY_BASE, "grid": grids,
                           "budget": {"tokens": tokens}})


DIVERGES = {"model.n_experts": [4], "model.top_k": [2], "train.lr": [1e6],
            "train.grad_clip": [0.0]}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """3 good runs and one that diverges, launched once with the local executor."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    spec = tiny_spec(DIVERGES)
    report = launch(spec, sweep_dir, executor="local", max_parallel=2, progress=True)
    return spec, sweep_dir, report


def test_local_launch_finishes_good_runs_and_reports_the_failure(local_sweep):
    spec, sweep_dir, report = local_sweep
    runs = plan(spec)
    assert sorted(report.submitted) == sorted(r.run_id for r in runs)
    bad = next(r.run_id for r in runs if r.config.train.lr == 1e6)
    assert report.final_states == {r.run_id: "failed" if r.run_id == bad else "done"
                                   for r in runs}
    by_id = {s.run_id: s for s in status(sweep_dir)}
    assert by_id[bad].state == "failed" and "non-finite" in by_id[bad].reason
    assert all(s.state == "done" and s.tokens_done == 1024 and s.attempts == 1
               for rid, s in by_id.items() if rid != bad)
    assert (sweep_dir / "sweep.toml").is_file()


def test_status_formats(local_sweep):
    _, sweep_dir, _ = local_sweep
    rows = json.loads(format_status(status(sweep_dir), "json"))
    assert {"run_id", "state", "progress", "last_loss", "attempts", "job_id", "reason"} <= set(
        rows[0])
    table = format_status(status(sweep_dir), "table")
    assert "4 runs: 0 pending, 0 running, 3 done, 1 failed" in table


def test_collect_writes_design_columns_and_skips_bad_runs(local_sweep, tmp_path):
    _, sweep_dir, _ = local_sweep
    result = collect(sweep_dir)
    assert result.path == sweep_dir / "results.parquet"
    table = pd.read_parquet(result.path)
    assert len(table) == 3 and table["run_id"].is_unique
    for col in ("run_id", "d_model", "n_layers", "n_experts", "top_k", "sparsity",
                "n_params_total", "n_params_active", "n_params_embedding", "tokens", "tpp",
                "flops", "train_loss", "val_loss"):
        assert col in table.columns and table[col].notna().all(), col
    assert [reason for _, reason in result.skipped] == ["no result.json (not finished)"]
    csv = collect(sweep_dir, tmp_path / "r.csv")
    assert len(pd.read_csv(csv.path)) == 3


def test_collect_survives_malformed_results(local_sweep, tmp_path):
    _, sweep_dir, _ = local_sweep
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    good = sorted(p for p in (copy / "runs").iterdir() if (p / "result.json").is_file())
    (good[0] / "result.json").write_text("{not json")
    (good[1] / "result.json").write_text("[1, 2]")
    result = collect(copy, copy / "out.csv")
    assert len(result.table) == 1
    reasons = dict(result.skipped)
    assert "malformed" in reasons[good[0].name] and "expected an object" in reasons[good[1].name]


def test_relaunch_resubmits_only_failed_runs(local_sweep):
    spec, sweep_dir, first = local_sweep
    report = launch(spec, sweep_dir, executor="debug", progress=False)
    bad = [r for r, s in first.final_states.items() if s == "failed"]
    assert list(report.submitted) == bad
    assert sorted(report.skipped_done) == sorted(r for r in first.final_states if r not in bad)
    assert read_status(sweep_dir / "runs" / bad[0])["attempts"] == 2


def test_in_flight_run_is_not_submitted_twice(tmp_path):
    spec = tiny_spec(grid={"model.n_experts": [1], "model.top_k": [1]})
    run_dir = tmp_path / "runs" / plan(spec)[0].run_id
    # A job of this run is alive: this test's own process stands in for the worker.
    update_status(run_dir, state="running", job_ids=[f"local:{socket.gethostname()}:"
                                                     f"{os.getpid()}"])
    report = launch(spec, tmp_path, executor="debug", progress=False)
    assert report.submitted == () and report.skipped_in_flight == (run_dir.name,)


def test_concurrent_launch_is_refused(tmp_path):
    spec = tiny_spec(grid={"model.n_experts": [1], "model.top_k": [1]})
    with file_lock(tmp_path / ".launch.lock"):
        with pytest.raises(LaunchError, match="another `moe sweep launch`"):
            launch(spec, tmp_path, executor="debug")


def _hammer(run_dir: str, worker: int, n: int) -> None:
    for i in range(n):
        record_requeue(RunDir(run_dir), reason=f"w{worker}")
        record_submission(RunDir(run_dir), "slurm", f"{worker}_{i}")
        update_status(run_dir, tokens_done=i)


def test_many_writers_lose_no_update(tmp_path):
    run_dir = tmp_path / "run"
    atomic_write_json(run_dir / "status.json", {"state": "pending"})
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(run_dir), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    final = read_status(run_dir)
    assert final["attempts"] == 200 and len(set(final["job_ids"])) == 100


def test_display_writes_plain_lines_without_escape_codes(tmp_path):
    import io

    stream = io.StringIO()  # not a TTY
    display = Display(2, enabled=True, stream=stream)
    update_status(tmp_path, state="done", last_loss=1.5)
    display.event("started x")
    display.finished(RunDir(tmp_path), "done", 1.0)
    display.refresh([RunDir(tmp_path)])
    display.close()
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.splitlines() == ["[0/2] started x", f"[1/2] done {tmp_path.name} in 1.0s loss 1.5"]


def test_cli_registers_plan_launch_status_collect(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="moe")
    register(parser.add_subparsers(dest="command"))
    root = Path(__file__).resolve().parent.parent
    args = parser.parse_args(["sweep", "plan", str(root / "sweeps" / "pocket.toml"),
                              "--format", "json"])
    assert args.func(args) == 0
    assert len(json.loads(capsys.readouterr().out)) >= 12
    for argv in (["sweep", "launch", "s.toml", "--dir", "d", "--executor", "slurm"],
                 ["sweep", "status", "d", "--format", "json"], ["sweep", "collect", "d", "-o",
                                                                "x.csv"]):
        assert callable(parser.parse_args(argv).func)


def _ddp_rank(rank: int, run_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from moe.sweeps.job import run_in_dir

    run_in_dir(RunDir(run_dir))


def test_two_gloo_ranks_train_one_run_data_parallel(tmp_path):
    import torch.multiprocessing as tmp

    from moe.sweeps.launch import prepare_run_dir

    run = plan(tiny_spec(grid={"model.n_experts": [4], "model.top_k": [2]}))[0]
    run_dir = prepare_run_dir(SweepDir(tmp_path), run).path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_ddp_rank, args=(str(run_dir), port), nprocs=2, join=True)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["run_id"] == run.run_id
    assert read_status(run_dir)["state"] == "done"


def test_status_fails_a_run_whose_worker_died(tmp_path):
    import subprocess

    from moe.sweeps.launch import prepare_run_dir

    run = plan(tiny_spec(grid={"model.n_experts": [1], "model.top_k": [1]}))[0]
    run_dir = prepare_run_dir(SweepDir(tmp_path), run).path
    dead = subprocess.Popen(["true"])
    dead.wait()
    update_status(run_dir, state="running", job_ids=[f"local:{socket.gethostname()}:{dead.pid}"])
    (row,) = status(tmp_path)
    assert row.state == "failed" and "is gone" in row.reason
    assert status(tmp_path, ask_scheduler=False)[0].state == "running"


def test_requeues_count_once_whichever_way_they_happen(tmp_path):
    from moe.rundir import read_status
    from moe.sweeps.records import record_requeue, record_start, record_submission

    run = RunDir(tmp_path)
    record_submission(run, "slurm", job_id="7_0")
    record_start(run, "7_0", restarts=0)
    assert read_status(tmp_path)["attempts"] == 1
    record_start(run, "7_0", restarts=1)  # `scontrol requeue` by hand: not seen before
    assert read_status(tmp_path)["attempts"] == 2
    record_requeue(run, "preempted", job_id="7_0")  # submitit's checkpoint() path
    record_start(run, "7_0", restarts=2)  # the same requeue, seen again at start
    status = read_status(tmp_path)
    assert status["attempts"] == 3 and status["state"] == "running"


def test_adding_a_task_to_a_finished_sweep_evaluates_and_trains_nothing(tmp_path):
    grid = {"model.n_experts": [4], "model.top_k": [2]}
    first = tiny_spec(grid=grid)
    launch(first, tmp_path, executor="debug", progress=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    assert "task/pocket-memorization/loss" not in json.loads((run_dir / "result.json").read_text())

    raw = {"name": "tiny", "base": {**TINY_BASE, "eval": {"tasks": ["pocket-memorization"],
                                                          "max_items": 4, "accuracy": False}},
           "grid": [grid], "budget": {"tokens": 1024}}
    second = spec_from_dict(raw)
    assert [r.run_id for r in plan(second)] == [run_dir.name]  # eval is outside the run id
    report = launch(second, tmp_path, executor="debug", progress=False)
    assert report.final_states == {run_dir.name: "done"}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["task/pocket-memorization/loss"] > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # not one step trained
    assert "pocket-memorization" in (run_dir / "config.toml").read_text()
    again = launch(second, tmp_path, executor="debug", progress=False)
    assert again.submitted == () or list(again.submitted) == []


def test_a_sweep_launched_by_version_0_1_keeps_its_run_directories(tmp_path):
    from moe.config import legacy_config_hash

    spec = tiny_spec(grid={"model.n_experts": [4], "model.top_k": [2]})
    (run,) = plan(spec)
    legacy = tmp_path / "runs" / legacy_config_hash(run.config)
    legacy.mkdir(parents=True)
    (legacy / "config.toml").write_text(run.config.to_toml())
    report = launch(spec, tmp_path, executor="debug", progress=False)
    assert report.final_states == {legacy.name: "done"}
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [legacy.name]


def test_workers_import_this_checkout():
    from moe.sweeps.local import worker_env

    first = Path(worker_env()["PYTHONPATH"].split(os.pathsep)[0])
    assert (first / "moe" / "__init__.py").is_file()
    assert (first / "moe" / "__init__.py").resolve() == Path(__import__("moe").__file__).resolve()


def test_stale_temporary_files_are_cleaned_at_launch(tmp_path, monkeypatch):
    fakeslurm.install(tmp_path, monkeypatch)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    old = stale_file(sweep / ".results.parquet.abc.tmp", 7200)
    launch(fakeslurm.two_run_spec(), sweep, executor="slurm", progress=False)
    assert not old.exists()


def test_parallel_workers_divide_the_cores(monkeypatch):
    """Two runs side by side on N cores get N // 2 threads each (their `auto` cap), unless the
    user chose OMP_NUM_THREADS."""
    from moe.sweeps.local import worker_env

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_env(2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert worker_env(cores + 1)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_env(2)["OMP_NUM_THREADS"] == "3"


def test_each_workers_output_is_in_its_own_worker_log(local_sweep):
    """Forked workers write where exec'd ones did: each run's progress lines in its own
    worker.log, nothing of another run's."""
    _, sweep_dir, _ = local_sweep
    for run in SweepDir(sweep_dir).runs():
        log = run.worker_log_path.read_text()
        assert log.count("progress: step 1/") == 1, log  # one run's first step, once

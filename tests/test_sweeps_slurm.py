"""Sweeps on the real local SLURM cluster (`slurm/local-cluster up`, MOE_TEST_SLURM=1).

    MOE_TEST_SLURM=1 pytest -m slurm tests/test_sweeps_slurm.py
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import submitit

from moe.rundir import read_status
from moe.sweeps import collect, launch, load_profile, plan, status
from moe.sweeps.spec import spec_from_dict
from moe.sweeps.status import format_status
from tests.slurm_cluster import slurm_cluster  # noqa: F401
from tests.test_sweeps_launch import DIVERGES, TINY_BASE

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "slurm" / "profiles" / "local.toml"
SWEEP_TIMEOUT_S = 420


def tiny_slurm_spec(with_divergent: bool = True):
    """4 pocket runs (two widths, dense and E=4 k=2) plus, optionally, one that diverges."""
    grids = [{"model.d_model": [32, 48], "model.n_experts": [1], "model.top_k": [1]},
             {"model.d_model": [32, 48], "model.n_experts": [4], "model.top_k": [2]}]
    if with_divergent:
        grids.append(DIVERGES)
    return spec_from_dict({"name": "slurm-test", "base": TINY_BASE, "grid": grids,
                           "budget": {"tokens": 1024}})


class SbatchCounter:
    """Counts sbatch invocations by wrapping submitit's submission command."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        cls = submitit.slurm.slurm.SlurmExecutor
        original = cls._make_submission_command

        def counted(executor, path):
            self.calls += 1
            return original(executor, path)

        monkeypatch.setattr(cls, "_make_submission_command", counted)


def wait_finished(sweep_dir: Path, timeout_s: float = SWEEP_TIMEOUT_S) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        runs = status(sweep_dir)
        if all(r.state in ("done", "failed") for r in runs):
            return runs
        if time.monotonic() > deadline:
            logs = sorted((sweep_dir / "slurm").rglob("*.err"))
            tail = logs[-1].read_text()[-2000:] if logs else "(no logs)"
            raise TimeoutError(f"sweep not finished after {timeout_s}s:\n"
                               f"{format_status(runs)}\n{tail}")
        time.sleep(2)


@pytest.fixture(scope="module")
def slurm_sweep(slurm_cluster, tmp_path_factory):  # noqa: F811
    sweep_dir = tmp_path_factory.mktemp("slurm-sweep")
    spec = tiny_slurm_spec()
    profile = load_profile(PROFILE)
    with pytest.MonkeyPatch.context() as mp:
        counter = SbatchCounter(mp)
        first = launch(spec, sweep_dir, executor="slurm", profile=profile)
        sbatch_first = counter.calls
        # Relaunched at once, while the array is queued or running: nothing twice.
        again = launch(spec, sweep_dir, executor="slurm", profile=profile)
        sbatch_again = counter.calls - sbatch_first
    runs = wait_finished(sweep_dir)
    return dict(spec=spec, dir=sweep_dir, first=first, again=again, runs=runs,
                sbatch_first=sbatch_first, sbatch_again=sbatch_again, profile=profile)


def test_sweep_is_one_job_array_and_every_good_run_finishes(slurm_sweep):
    first = slurm_sweep["first"]
    assert len(first.submitted) == 5
    assert slurm_sweep["sbatch_first"] == 1
    assert len({job.split("_")[0] for job in first.job_ids.values()}) == 1
    good = {r.run_id for r in plan(tiny_slurm_spec(with_divergent=False))}
    states = {r.run_id: r.state for r in slurm_sweep["runs"]}
    assert {rid for rid, s in states.items() if s == "done"} == good
    result = collect(slurm_sweep["dir"])
    assert sorted(result.table["run_id"]) == sorted(good)
    assert result.table["val_loss"].notna().all()


def test_relaunch_while_in_flight_submits_nothing(slurm_sweep):
    again = slurm_sweep["again"]
    assert slurm_sweep["sbatch_again"] == 0 and again.submitted == ()
    assert sorted(again.skipped_in_flight) == sorted(slurm_sweep["first"].submitted)


def test_diverging_run_is_failed_with_its_reason(slurm_sweep):
    failed = [r for r in slurm_sweep["runs"] if r.state == "failed"]
    assert len(failed) == 1
    assert "non-finite loss" in failed[0].reason
    assert failed[0].job_id in slurm_sweep["first"].job_ids.values()


def test_relaunching_a_finished_sweep_submits_nothing(slurm_sweep, monkeypatch):
    counter = SbatchCounter(monkeypatch)
    report = launch(tiny_slurm_spec(with_divergent=False), slurm_sweep["dir"],
                    executor="slurm", profile=slurm_sweep["profile"])
    assert report.submitted == () and len(report.skipped_done) == 4
    assert counter.calls == 0


def preempt_spec():
    """Two identical runs (~600 steps, frequent checkpoints) in one array: one is preempted.

    They differ only in train.decay_frac, which the cosine schedule does not read (a field
    inside the run id that does not touch the numbers), so the uninterrupted twin, run in
    the same kind of SLURM job, is the reference.
    """
    base = {**TINY_BASE, "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64},
            "train": {**TINY_BASE["train"], "batch_size": 8, "checkpoint_every": 25,
                      "log_every": 5}}
    return spec_from_dict({"name": "preempt", "base": base, "budget": {"tokens": 300_000},
                           "grid": {"model.n_experts": [4], "model.top_k": [2],
                                    "train.decay_frac": [0.2, 0.3]}})


def test_preempted_run_resumes_and_ends_with_the_uninterrupted_loss(slurm_cluster,  # noqa: F811
                                                                    tmp_path):
    runs = plan(preempt_spec())
    report = launch(preempt_spec(), tmp_path, executor="slurm", profile=load_profile(PROFILE))
    preempted, reference = (tmp_path / "runs" / r.run_id for r in runs)
    job_id = report.job_ids[preempted.name]
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while not list((preempted / "checkpoints").glob("*.pt")):  # past its first checkpoint
        assert time.monotonic() < deadline, format_status(status(tmp_path))
        time.sleep(0.5)
    # What submitit's Job._interrupt() does: SIGTERM (ignored), then SIGUSR2, on which
    # submitit calls RunJob.checkpoint() and requeues the job.
    slurm_cluster.run("scancel", job_id, "--signal", "SIGTERM")
    slurm_cluster.run("scancel", job_id, "--signal", "USR2")
    final = wait_finished(tmp_path)
    assert all(r.state == "done" for r in final), format_status(final)
    assert read_status(preempted)["attempts"] == 2, read_status(preempted)
    assert read_status(reference)["attempts"] == 1
    assert len(slurm_cluster.job_states(job_id)) >= 2  # accounting saw the requeue
    interrupted = json.loads((preempted / "result.json").read_text())
    uninterrupted = json.loads((reference / "result.json").read_text())
    assert interrupted["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)
    assert interrupted["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=1e-6)


def test_two_task_job_trains_one_run_data_parallel(slurm_cluster, tmp_path):  # noqa: F811
    profile = replace(load_profile(PROFILE), tasks_per_node=2)
    spec = spec_from_dict({"name": "ddp", "base": TINY_BASE, "budget": {"tokens": 1024},
                           "grid": {"model.n_experts": [4], "model.top_k": [2]}})
    report = launch(spec, tmp_path, executor="slurm", profile=profile)
    (run_id,) = report.submitted
    runs = wait_finished(tmp_path)
    assert runs[0].state == "done", format_status(runs)
    result = json.loads((tmp_path / "runs" / run_id / "result.json").read_text())
    assert result["world_size"] == 2

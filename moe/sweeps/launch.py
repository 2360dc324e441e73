"""`moe sweep launch`: create the sweep directory and start every run that needs starting.

Relaunching is idempotent: a run with result.json is skipped; a run whose last
job the scheduler still has queued or running is skipped (never submitted
twice); failed, cancelled and never-started runs are (re)submitted and resume
from their checkpoints. A lock on the sweep directory makes a second concurrent
launch fail at once instead of double-submitting.

The runs are started by an executor (`moe.sweeps.executor`: `local`, `debug` or `slurm`,
one module each). A run whose status.json or result.json cannot be parsed is reported
(`unreadable`) and the others go ahead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from moe.config import ConfigError, config_hash, legacy_config_hash
from moe.record import task_column
from moe.rundir import RunDir, UnreadableRunFile
from moe.sweepdir import SweepDir
from moe.sweeps.executor import EXECUTORS, LaunchError, check_sweep_name, make_executor
from moe.sweeps.plan import RunPlan, plan, with_estimate
from moe.sweeps.profile import ClusterProfile
from moe.sweeps.scheduler import ACTIVE, LOCAL_ALIVE, SchedulerError, job_states
from moe.sweeps.spec import SweepSpec
from moe.sweeps.status import read_run_files

__all__ = ["EXECUTORS", "LaunchError", "LaunchReport", "check_sweep_name", "launch",
           "missing_tasks", "prepare_run_dir", "select_runs"]


@dataclass(frozen=True, kw_only=True)
class LaunchReport:
    """What a launch did."""

    submitted: tuple[str, ...] = ()
    """Run ids started or submitted by this launch."""
    skipped_done: tuple[str, ...] = ()
    """Runs with a result.json already."""
    skipped_in_flight: tuple[str, ...] = ()
    """Runs whose job is still queued or running."""
    job_ids: dict[str, str] = field(default_factory=dict)
    """run_id -> scheduler job id (slurm only)."""
    final_states: dict[str, str] = field(default_factory=dict)
    """run_id -> done | failed (local and debug executors, which wait for the runs)."""
    unreadable: tuple[tuple[str, str], ...] = ()
    """(run_id, reason) of runs left alone because a run file cannot be parsed."""


def launch(spec: SweepSpec, sweep_dir: SweepDir | str | os.PathLike, executor: str = "local",
           max_parallel: int = 2, progress: bool = True,
           profile: ClusterProfile | None = None) -> LaunchReport:
    """Plan (validating everything), then start the runs of `spec` in `sweep_dir`."""
    starter = make_executor(executor, max_parallel=max_parallel, progress=progress,
                            profile=profile, sweep_name=spec.name)
    estimate = with_estimate(spec, profile.mfu, profile.gpu_peak_tflops) if profile else None
    runs = plan(spec, estimate, profile)
    sweep = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
    with sweep.launch_lock() as held:
        if not held:
            raise LaunchError(f"another `moe sweep launch` is running on {sweep.path} "
                              f"(lock {sweep.launch_lock_path}); wait for it to finish")
        sweep.clean_stale_tmp()
        sweep.write_spec(spec.to_toml())
        prepared, unreadable = _prepare_all(sweep, runs)
        todo, done, in_flight, bad = select_runs([d for _, d in prepared])
        report = LaunchReport(submitted=tuple(d.name for d in todo),
                              skipped_done=tuple(d.name for d in done),
                              skipped_in_flight=tuple(d.name for d in in_flight),
                              unreadable=(*unreadable, *bad))
        if not todo:
            return report
        started = starter.start(todo, sweep, {d.name: r for r, d in prepared})
        return replace(report, job_ids=started.job_ids, final_states=started.final_states)


def _prepare_all(sweep: SweepDir, runs: list[RunPlan]
                 ) -> tuple[list[tuple[RunPlan, RunDir]], list[tuple[str, str]]]:
    """prepare_run_dir for every run; a run whose config.toml cannot be parsed is set aside."""
    prepared, unreadable = [], []
    for run in runs:
        try:
            prepared.append((run, prepare_run_dir(sweep, run)))
        except (ConfigError, UnreadableRunFile) as exc:
            unreadable.append((run.run_id, f"config.toml is unreadable: {exc}"[:300]))
    for _, d in prepared:
        d.clean_stale_tmp()
    return prepared, unreadable


def prepare_run_dir(sweep: SweepDir, run: RunPlan) -> RunDir:
    """runs/<run_id>/config.toml: written once, and updated when only settings outside the
    run id changed (evaluation tasks, logging), so a finished run is evaluated, not retrained.

    A run launched by version 0.1 lives under its old id (a hash of every field) and is used.
    """
    rd = sweep.run(run.run_id)
    legacy = sweep.run(legacy_config_hash(run.config))
    if not rd.path.exists() and legacy.has_config():
        rd = legacy
    if rd.has_config():
        existing = rd.read_config()
        if config_hash(existing) != run.run_id:
            raise LaunchError(f"{rd.config_path} does not hash to its run id {run.run_id}; it "
                              "was edited by hand: move the run directory away and relaunch")
        if existing == run.config:
            return rd
    rd.write_config(run.config)
    return rd


def missing_tasks(run: RunDir) -> list[str]:
    """Tasks in the run's config that its finished result has no columns for."""
    result = run.read_result() or {}
    return [t for t in run.read_config().eval.tasks if task_column(t) not in result]


def select_runs(dirs: list[RunDir]
                ) -> tuple[list[RunDir], list[RunDir], list[RunDir], list[tuple[str, str]]]:
    """Split run dirs into (to submit, done, still queued or running, unreadable with why)."""
    last_jobs, bad = {}, []
    for d in dirs:
        status = read_run_files(d)
        if isinstance(status, str):
            bad.append((d.name, status))
            continue
        if not d.is_done() and status.get("state") in ("pending", "running") \
                and status.get("job_ids"):
            last_jobs[d] = str(status["job_ids"][-1])
    dirs = [d for d in dirs if d.name not in dict(bad)]
    try:
        states = job_states(list(last_jobs.values())) if last_jobs else {}
    except SchedulerError as exc:
        raise LaunchError(f"cannot tell whether earlier jobs still run, so nothing was "
                          f"submitted: {exc}") from None
    todo, done, in_flight = [], [], []
    for d in dirs:
        if d.is_done() and not missing_tasks(d):
            done.append(d)
        elif d in last_jobs and states.get(last_jobs[d]) in ACTIVE | {LOCAL_ALIVE}:
            in_flight.append(d)
        else:
            todo.append(d)
    return todo, done, in_flight, bad

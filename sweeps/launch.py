"""`moe sweep launch`: create the sweep directory and start every run that needs starting.

Relaunching is idempotent: a run with result.json is skipped; a run whose last
job the scheduler still has queued or running is skipped (never submitted
twice); failed, cancelled and never-started runs are (re)submitted and resume
from their checkpoints. A lock on the sweep directory makes a second concurrent
launch fail at once instead of double-submitting.

Executors: `local` (worker processes on this machine), `debug` (in this
process, one after another) and `slurm` (ONE submitit job array per launch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from moe.config import config_hash, load_config
from moe.io import atomic_write_text, file_lock
from moe.rundir import CONFIG, is_done, read_status
from sweeps.plan import RunPlan, plan, with_estimate
from sweeps.profile import ClusterProfile
from sweeps.records import record_failure, record_submission
from sweeps.scheduler import ACTIVE, LOCAL_ALIVE, SchedulerError, job_states
from sweeps.spec import SweepSpec
from sweeps.status import RUNS

EXECUTORS = ("local", "debug", "slurm")
LOCK = ".launch.lock"
SLURM_LOGS = "slurm"


class LaunchError(ValueError):
    """A launch cannot go ahead (locked directory, scheduler unreachable, submission failed)."""


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


def launch(spec: SweepSpec, sweep_dir: str | os.PathLike, executor: str = "local",
           max_parallel: int = 2, progress: bool = True,
           profile: ClusterProfile | None = None) -> LaunchReport:
    """Plan (validating everything), then start the runs of `spec` in `sweep_dir`."""
    if executor not in EXECUTORS:
        raise LaunchError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if profile is not None and executor != "slurm":
        raise LaunchError("--cluster applies to the slurm executor only")
    estimate = with_estimate(spec, profile.mfu, profile.gpu_peak_tflops) if profile else None
    runs = plan(spec, estimate)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(sweep_dir / LOCK, blocking=False) as held:
        if not held:
            raise LaunchError(f"another `moe sweep launch` is running on {sweep_dir} "
                              f"(lock {sweep_dir / LOCK}); wait for it to finish")
        atomic_write_text(sweep_dir / "sweep.toml", spec.to_toml())
        dirs = [prepare_run_dir(sweep_dir, run) for run in runs]
        todo, done, in_flight = select_runs(dirs)
        report = LaunchReport(submitted=tuple(d.name for d in todo),
                              skipped_done=tuple(d.name for d in done),
                              skipped_in_flight=tuple(d.name for d in in_flight))
        if not todo:
            return report
        if executor == "slurm":
            job_ids = submit_slurm(todo, sweep_dir, profile or ClusterProfile(), spec.name)
            return replace(report, job_ids=job_ids)
        if executor == "local":
            from sweeps.local import run_local

            final = run_local(todo, max_parallel=max_parallel, progress=progress)
        else:
            final = run_debug(todo)
        return replace(report, final_states=final)


def prepare_run_dir(sweep_dir: Path, run: RunPlan) -> Path:
    """runs/<run_id>/config.toml, written once (its content is what the id hashes)."""
    run_dir = sweep_dir / RUNS / run.run_id
    path = run_dir / CONFIG
    if path.is_file():
        if config_hash(load_config(path)) != run.run_id:
            raise LaunchError(f"{path} does not hash to its run id {run.run_id}; it was edited "
                              "by hand: move the run directory away and relaunch")
        return run_dir
    atomic_write_text(path, run.config.to_toml())
    return run_dir


def select_runs(dirs: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """Split run dirs into (to submit, done, still queued or running)."""
    last_jobs = {}
    for d in dirs:
        status = read_status(d)
        if not is_done(d) and status.get("state") in ("pending", "running") \
                and status.get("job_ids"):
            last_jobs[d] = str(status["job_ids"][-1])
    try:
        states = job_states(list(last_jobs.values())) if last_jobs else {}
    except SchedulerError as exc:
        raise LaunchError(f"cannot tell whether earlier jobs still run, so nothing was "
                          f"submitted: {exc}") from None
    todo, done, in_flight = [], [], []
    for d in dirs:
        if is_done(d):
            done.append(d)
        elif d in last_jobs and states.get(last_jobs[d]) in ACTIVE | {LOCAL_ALIVE}:
            in_flight.append(d)
        else:
            todo.append(d)
    return todo, done, in_flight


def submit_slurm(dirs: list[Path], sweep_dir: Path, profile: ClusterProfile,
                 name: str) -> dict[str, str]:
    """Submit every run as one task of ONE job array (one sbatch call); return job ids."""
    import submitit

    from sweeps.job import RunJob
    from sweeps.local import PACKAGE_ROOT

    executor = submitit.AutoExecutor(folder=sweep_dir / SLURM_LOGS / "%j", cluster="slurm")
    params = profile.executor_parameters(job_name=f"moe-{name}")
    # Jobs unpickle RunJob, so they must import this checkout even if it is not installed.
    params["slurm_setup"] = [f"export PYTHONPATH={PACKAGE_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}",
                             *params["slurm_setup"]]
    try:
        executor.update_parameters(**params)
    except ValueError as exc:
        raise LaunchError(f"cluster profile rejected by submitit: {exc}") from None
    jobs = []
    try:
        with executor.batch():
            for d in dirs:
                jobs.append(executor.submit(RunJob(d.resolve())))
    except Exception as exc:
        for d in dirs:
            record_failure(d, f"submission failed: {exc}"[:500])
        raise LaunchError(f"sbatch failed, nothing was submitted: {exc}") from None
    for d, job in zip(dirs, jobs, strict=True):
        record_submission(d, "slurm", job.job_id)
    return {d.name: job.job_id for d, job in zip(dirs, jobs, strict=True)}


def run_debug(dirs: list[Path]) -> dict[str, str]:
    """Train each run in this process, one after another (for debugging with pdb)."""
    from moe.train import TrainingFailed
    from sweeps.job import run_in_dir

    final = {}
    for d in dirs:
        record_submission(d, "debug")
        try:
            run_in_dir(d)
        except TrainingFailed:
            pass  # recorded in status.json; go on with the other runs
        except Exception as exc:
            record_failure(d, f"{type(exc).__name__}: {exc}"[:500])
        final[d.name] = "done" if is_done(d) else "failed"
    return final


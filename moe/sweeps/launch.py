"""`moe sweep launch`: create the sweep directory and start every run that needs starting.

Relaunching is idempotent: a run with result.json is skipped; a run whose last
job the scheduler still has queued or running is skipped (never submitted
twice); failed, cancelled and never-started runs are (re)submitted and resume
from their checkpoints. A lock on the sweep directory makes a second concurrent
launch fail at once instead of double-submitting.

Executors: `local` (worker processes on this machine), `debug` (in this
process, one after another) and `slurm` (ONE submitit job array per launch).

Nothing from a spec or profile reaches the batch script unchecked: the sweep name
is `[A-Za-z0-9._-]`, profile strings hold no control characters (`moe.sweeps.profile`),
and every value the script's shell reads is quoted. A run whose status.json or
result.json cannot be parsed is reported (`unreadable`) and the others go ahead.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field, replace

from moe.config import ConfigError, config_hash, legacy_config_hash
from moe.record import task_column
from moe.rundir import RunDir, UnreadableRunFile
from moe.sweepdir import SweepDir
from moe.sweeps.plan import RunPlan, plan, requeue_limit, with_estimate
from moe.sweeps.profile import ClusterProfile, check_no_control_chars
from moe.sweeps.records import record_failure, record_submission
from moe.sweeps.scheduler import ACTIVE, LOCAL_ALIVE, SchedulerError, job_states
from moe.sweeps.spec import SweepSpec
from moe.sweeps.status import read_run_files

EXECUTORS = ("local", "debug", "slurm")
SWEEP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


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
    unreadable: tuple[tuple[str, str], ...] = ()
    """(run_id, reason) of runs left alone because a run file cannot be parsed."""


def check_sweep_name(name: str) -> str:
    """The sweep name goes into job names and the batch script: [A-Za-z0-9._-] only."""
    if not isinstance(name, str) or not SWEEP_NAME.match(name):
        raise LaunchError(f"sweep name {name!r} may hold only letters, digits, '.', '_' and '-' "
                          "(1 to 100 of them); rename it in the spec")
    return name


def _require(packages: tuple[str, ...]) -> None:
    """ModuleNotFoundError (the CLI names the extra) before anything is written, when a
    package the executor needs is missing (the local workers train with torch)."""
    import importlib.util

    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"No module named '{package}'", name=package)


def launch(spec: SweepSpec, sweep_dir: SweepDir | str | os.PathLike, executor: str = "local",
           max_parallel: int = 2, progress: bool = True,
           profile: ClusterProfile | None = None) -> LaunchReport:
    """Plan (validating everything), then start the runs of `spec` in `sweep_dir`."""
    if executor not in EXECUTORS:
        raise LaunchError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if profile is not None and executor != "slurm":
        raise LaunchError("--cluster applies to the slurm executor only")
    if executor == "local" and not (isinstance(max_parallel, int) and max_parallel >= 1):
        raise LaunchError(f"--max-parallel {max_parallel} must be at least 1")
    check_sweep_name(spec.name)
    _require(("torch",) if executor != "slurm" else ("submitit",))
    estimate = with_estimate(spec, profile.mfu, profile.gpu_peak_tflops) if profile else None
    runs = plan(spec, estimate, profile)
    sweep = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
    with sweep.launch_lock() as held:
        if not held:
            raise LaunchError(f"another `moe sweep launch` is running on {sweep.path} "
                              f"(lock {sweep.launch_lock_path}); wait for it to finish")
        sweep.clean_stale_tmp()
        sweep.write_spec(spec.to_toml())
        dirs, unreadable = _prepare_all(sweep, runs)
        todo, done, in_flight, bad = select_runs(dirs)
        report = LaunchReport(submitted=tuple(d.name for d in todo),
                              skipped_done=tuple(d.name for d in done),
                              skipped_in_flight=tuple(d.name for d in in_flight),
                              unreadable=(*unreadable, *bad))
        if not todo:
            return report
        if executor == "slurm":
            profile = profile or ClusterProfile()
            nodes = {d.name: (r.layout or {}).get("nodes", profile.nodes)
                     for d, r in zip(dirs, runs, strict=True)}
            job_ids = submit_slurm(todo, sweep, profile, spec.name, nodes=nodes,
                                   max_num_timeout=profile.max_num_timeout or
                                   requeue_limit(runs, profile))
            return replace(report, job_ids=job_ids)
        if executor == "local":
            from moe.sweeps.local import run_local

            final = run_local(todo, max_parallel=max_parallel, progress=progress)
        else:
            final = run_debug(todo)
        return replace(report, final_states=final)


def _prepare_all(sweep: SweepDir, runs: list[RunPlan]
                 ) -> tuple[list[RunDir], list[tuple[str, str]]]:
    """prepare_run_dir for every run; a run whose config.toml cannot be parsed is set aside."""
    dirs, unreadable = [], []
    for run in runs:
        try:
            dirs.append(prepare_run_dir(sweep, run))
        except (ConfigError, UnreadableRunFile) as exc:
            unreadable.append((run.run_id, f"config.toml is unreadable: {exc}"[:300]))
    for d in dirs:
        d.clean_stale_tmp()
    return dirs, unreadable


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


def submit_slurm(dirs: list[RunDir], sweep: SweepDir, profile: ClusterProfile, name: str,
                 nodes: dict[str, int] | None = None, max_num_timeout: int = 3
                 ) -> dict[str, str]:
    """Submit every run as one task of a job array (one sbatch call per planned node count:
    `nodes` maps a run dir's name to it); return job ids."""
    import submitit

    from moe.sweeps.job import RunJob
    from moe.sweeps.local import PACKAGE_ROOT

    check_no_control_chars("sweep directory", str(sweep.path.resolve()))
    check_no_control_chars("checkout path", str(PACKAGE_ROOT))
    executor = submitit.AutoExecutor(folder=sweep.slurm_job_folder, cluster="slurm",
                                     slurm_max_num_timeout=max_num_timeout)
    params = profile.executor_parameters(job_name=f"moe-{check_sweep_name(name)}")
    # Jobs unpickle RunJob, so they must import this checkout even if it is not installed;
    # the path is quoted (a space or a `$` in it must not split or expand).
    root = shlex.quote(str(PACKAGE_ROOT))
    params["slurm_setup"] = [f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}",
                             *params["slurm_setup"]]
    groups: dict[int, list[RunDir]] = {}
    for d in dirs:
        groups.setdefault((nodes or {}).get(d.name, profile.nodes), []).append(d)
    dirs = [d for group in groups.values() for d in group]  # jobs come back in this order
    jobs = []
    try:
        for n_nodes, group in groups.items():
            try:
                executor.update_parameters(**{**params, "nodes": n_nodes})
            except ValueError as exc:
                raise LaunchError(f"cluster profile rejected by submitit: {exc}") from None
            with executor.batch():
                for d in group:
                    jobs.append(executor.submit(RunJob(RunDir(d.path.resolve()))))
    except LaunchError:
        raise
    except Exception as exc:
        for d in dirs:
            record_failure(d, f"submission failed: {exc}"[:500])
        raise LaunchError(f"sbatch failed, nothing was submitted: {exc}") from None
    for d, job in zip(dirs, jobs, strict=True):
        record_submission(d, "slurm", job.job_id)
    return {d.name: job.job_id for d, job in zip(dirs, jobs, strict=True)}


def run_debug(dirs: list[RunDir]) -> dict[str, str]:
    """Train each run in this process, one after another (for debugging with pdb)."""
    from moe.sweeps.job import run_in_dir
    from moe.train import TrainingFailed

    final = {}
    for d in dirs:
        record_submission(d, "debug")
        try:
            run_in_dir(d)
        except TrainingFailed:
            pass  # recorded in status.json; go on with the other runs
        except Exception as exc:
            record_failure(d, f"{type(exc).__name__}: {exc}"[:500])
        final[d.name] = "done" if d.is_done() else "failed"
    return final


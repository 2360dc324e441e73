"""The `slurm` executor: every run one task of a submitit job array (one sbatch call per
planned node count), returning the job ids at once; a job's `RunJob` trains its run and
requeues itself on preemption or timeout (`moe.sweeps.job`).

Nothing from a spec or profile reaches the batch script unchecked: the sweep name is
`[A-Za-z0-9._-]` (`check_sweep_name`), profile strings hold no control characters
(`moe.sweeps.profile`), and every value the script's shell reads is quoted. Job folders
are the sweep's (`SweepDir.slurm_job_folder`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from moe.rundir import RunDir
from moe.sweepdir import SweepDir
from moe.sweeps.executor import Executor, LaunchError, Started, check_sweep_name
from moe.sweeps.plan import RunPlan, requeue_limit
from moe.sweeps.profile import ClusterProfile, check_no_control_chars
from moe.sweeps.records import record_failure, record_submission


@dataclass(frozen=True)
class SlurmExecutor(Executor):
    profile: ClusterProfile
    sweep_name: str
    name = "slurm"
    needs = ("submitit",)

    @classmethod
    def from_options(cls, *, profile: ClusterProfile | None, sweep_name: str,
                     **_options) -> SlurmExecutor:
        return cls(profile or ClusterProfile(), sweep_name)

    def start(self, runs: list[RunDir], sweep: SweepDir, plans: dict[str, RunPlan]) -> Started:
        nodes = {name: (plan.layout or {}).get("nodes", self.profile.nodes)
                 for name, plan in plans.items()}
        limit = self.profile.max_num_timeout or requeue_limit(list(plans.values()), self.profile)
        return Started(job_ids=submit_slurm(runs, sweep, self.profile, self.sweep_name,
                                            nodes=nodes, max_num_timeout=limit))


EXECUTOR = SlurmExecutor


def submit_slurm(runs: list[RunDir], sweep: SweepDir, profile: ClusterProfile, name: str,
                 nodes: dict[str, int] | None = None, max_num_timeout: int = 3
                 ) -> dict[str, str]:
    """Submit every run as one task of a job array (one sbatch call per planned node count:
    `nodes` maps a run directory's name to it); return {run_id: job id}."""
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
    for run in runs:
        groups.setdefault((nodes or {}).get(run.name, profile.nodes), []).append(run)
    runs = [run for group in groups.values() for run in group]  # jobs come back in this order
    jobs = []
    try:
        for n_nodes, group in groups.items():
            try:
                executor.update_parameters(**{**params, "nodes": n_nodes})
            except ValueError as exc:
                raise LaunchError(f"cluster profile rejected by submitit: {exc}") from None
            with executor.batch():
                for run in group:
                    jobs.append(executor.submit(RunJob(RunDir(run.path.resolve()))))
    except LaunchError:
        raise
    except Exception as exc:
        for run in runs:
            record_failure(run, f"submission failed: {exc}"[:500])
        raise LaunchError(f"sbatch failed, nothing was submitted: {exc}") from None
    for run, job in zip(runs, jobs, strict=True):
        record_submission(run, "slurm", job.job_id)
    return {run.name: job.job_id for run, job in zip(runs, jobs, strict=True)}

"""The local SLURM cluster runs submitit jobs, keeps accounting, and requeues.

Run with the cluster up:
    slurm/local-cluster up
    MOE_TEST_SLURM=1 python -m pytest tests/test_slurm_cluster.py -v -m slurm

The job functions are defined inside the tests so that cloudpickle ships them
by value: the job's Python need not be able to import this test module.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import submitit

try:
    from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401
except ModuleNotFoundError:  # plain `pytest` puts tests/ itself on sys.path
    from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401

JOB_TIMEOUT_S = 90


def _executor(cluster: SlurmCluster, folder: Path, timeout_min: int) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(slurm_partition=cluster.partition, timeout_min=timeout_min,
                               cpus_per_task=cluster.profile["cpus_per_task"],
                               mem_gb=cluster.profile["mem_gb"])
    return executor


def _result(job: submitit.Job, timeout_s: float = JOB_TIMEOUT_S):
    """job.result(), but failing after timeout_s instead of hanging the suite."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            raise TimeoutError(f"job {job.job_id} not done after {timeout_s}s "
                               f"(state {job.state}); see {job.paths.stderr}")
        time.sleep(2)
    return job.result()


def _wait_for_file(path: Path, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written after {timeout_s}s: the job never started")
        time.sleep(1)


@pytest.mark.slurm
def test_submitit_job_runs_and_is_accounted(slurm_cluster: SlurmCluster, tmp_path: Path):
    def answer() -> int:
        return 42

    job = _executor(slurm_cluster, tmp_path, timeout_min=2).submit(answer)

    assert _result(job) == 42
    # sacct answers only through slurmdbd: this proves accounting is on.
    assert slurm_cluster.job_states(job.job_id)[-1] == "COMPLETED"
    assert job.state == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.parametrize("requeue_by", ["submitit-preemption", "scontrol"])
def test_checkpointable_job_finishes_after_requeue(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                   requeue_by: str):
    attempts_file = tmp_path / "attempts.txt"

    class SleepUntilRequeued(submitit.helpers.Checkpointable):
        """Appends one line per attempt; the first attempt sleeps until it is requeued."""

        def __init__(self) -> None:
            self.checkpointed_calls = 0

        def __call__(self, attempts_path: str) -> int:
            import os

            self.checkpointed_calls += 1
            with open(attempts_path, "a") as f:
                f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')} "
                        f"{self.checkpointed_calls}\n")
            with open(attempts_path) as f:
                attempt = len(f.read().splitlines())
            if attempt == 1:
                time.sleep(600)
            return attempt

    job = _executor(slurm_cluster, tmp_path, timeout_min=5).submit(
        SleepUntilRequeued(), str(attempts_file))
    _wait_for_file(attempts_file)
    if requeue_by == "submitit-preemption":
        # SIGTERM (ignored) then SIGUSR2: submitit checkpoints and runs `scontrol requeue`.
        job._interrupt()
    else:
        slurm_cluster.run("scontrol", "requeue", job.job_id)

    # Requeueing SIGTERMs every process of the job, and submitit's own `scontrol requeue`
    # child can die of it; the first attempt then leaves an error result that makes
    # `job.done()` true while the requeued attempt is still pending. Wait for accounting
    # to say the job has ended before reading the result, which the second attempt
    # rewrites.
    slurm_cluster.wait_for_state(job.job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"},
                                 timeout_s=JOB_TIMEOUT_S)
    assert _result(job) == 2
    # One line per attempt: SLURM_RESTART_COUNT, then the object's own call count,
    # which survives through submitit's checkpoint but restarts after a bare requeue.
    attempts = [tuple(line.split()) for line in attempts_file.read_text().splitlines()]
    second_call = "2" if requeue_by == "submitit-preemption" else "1"
    assert attempts == [("0", "1"), ("1", second_call)]
    states = slurm_cluster.job_states(job.job_id)
    assert states[-1] == "COMPLETED" and "REQUEUED" in states[:-1], states

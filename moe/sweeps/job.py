"""What runs inside one job: train one run directory, possibly data-parallel.

The same entry, `run_in_dir`, serves every executor: the `debug` executor calls
it in-process, `local` workers run `python -m moe.sweeps.job RUN_DIR`, and SLURM
array tasks call a pickled `RunJob`, whose `checkpoint()` requeues the same
run: on a timeout or preemption submitit calls it, the job goes back to the
queue, and the next attempt resumes from the run's last checkpoint.

A job with several tasks (a profile with nodes * tasks_per_node > 1) trains one
run with torch.distributed data parallel; so does a process started with
WORLD_SIZE > 1 and MASTER_ADDR/MASTER_PORT/RANK in its environment (how the CPU
tests start two gloo ranks).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import submitit

from moe.rundir import RunDir, RunLocked
from moe.sweeps.records import record_requeue, record_start
from moe.sweeps.scheduler import EXECUTOR_ENV, local_job_id

EXIT_FAILED = 3  # a worker's exit code when training failed (status.json says why)


class RunJob(submitit.helpers.Checkpointable):
    """A picklable, requeue-able call that trains the run in `run`."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def __call__(self) -> dict[str, Any]:
        return run_in_dir(self.run, progress=True)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Called by submitit on rank 0 when the job is preempted or times out. During
        # training the signal first made every rank write a checkpoint at the step
        # boundary (`moe.train.preempt`), so the requeued job is just a fresh RunJob for
        # the same directory: it resumes from there. How often a timed-out job requeues
        # is `max_num_timeout` (the cluster profile's, or `plan.requeue_limit`).
        record_requeue(self.run, reason="requeued after preemption or timeout",
                       job_id=current_job_id())
        return submitit.helpers.DelayedSubmission(RunJob(self.run))


def run_in_dir(run: RunDir, *, progress: bool = False) -> dict[str, Any]:
    """Train (or resume) the run whose config.toml is in `run`; return its result record.
    `progress`: report progress on stderr (a job's log; `moe.train.progress`)."""
    from moe.train import TrainingFailed, train_run  # torch is imported only inside jobs
    from moe.train.preempt import Preempted

    cfg = run.read_config()
    owns_group = _init_distributed(cfg.parallel.timeout_min)
    rank0 = _rank() == 0
    try:
        if rank0 and not run.is_done():
            with run.writer_lock():  # another job trains this run: fail before touching status
                pass
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
            record_start(run, current_job_id(), restarts)
        with _preemption_watch():
            return train_run(cfg, run, progress=progress)
    except Preempted:
        return {}  # a rank other than 0 after the checkpoint; rank 0's handler requeued
    except (TrainingFailed, RunLocked):
        raise  # failed: train_run wrote why; locked: the status is the other writer's
    except Exception as exc:
        if rank0:
            run.update_status(state="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _preemption_watch():
    """Under submitit: its stop warning (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says
    otherwise) makes training checkpoint at the next step boundary before the requeue."""
    import contextlib
    import signal

    from moe.train.preempt import PreemptionWatch

    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return contextlib.nullcontext()
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return PreemptionWatch(getattr(signal, f"SIG{name}", signal.SIGUSR2))


def current_job_id() -> str | None:
    """The id of the job we run in, as the launcher records it (None in-process)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return submitit.JobEnvironment().job_id
    if os.environ.get(EXECUTOR_ENV) == "local":
        return local_job_id(os.getpid())
    return None


def _init_distributed(timeout_min: float) -> bool:
    """Start a process group when this job has several ranks; True if we started it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False  # the caller owns it
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        if submitit.JobEnvironment().num_tasks <= 1:
            return False
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True)
    from moe.train.distributed import init_from_env

    return init_from_env(timeout_min)


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m moe.sweeps.job RUN_DIR`: the local executor's worker process."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m moe.sweeps.job RUN_DIR", file=sys.stderr)
        return 2
    from moe.train import TrainingFailed
    from moe.train.signals import Terminated

    try:
        run_in_dir(RunDir(argv[0]), progress=True)
    except TrainingFailed as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Terminated as exc:  # SIGTERM / SIGHUP: checkpointed, status.json says so
        print(f"{exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

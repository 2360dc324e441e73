"""The launcher's side of status.json: submissions, job ids, attempts, requeues.

The training job writes state/progress/loss into the same file; every write here
is a locked read-modify-write (`moe.rundir.RunDir.edit_status`), so many jobs and a
launcher can update one sweep directory at once without losing a field.
"""

from __future__ import annotations

import time
from typing import Any

from moe.rundir import RunDir


def _update(run: RunDir, fn) -> dict[str, Any]:
    return run.edit_status(fn)


def record_submission(run: RunDir, executor: str,
                      job_id: str | None = None) -> dict[str, Any]:
    """One more attempt: the executor, the new job id, and state pending.

    Written after the job is submitted (one write per run). The job may already
    have started and said so (it records its own `job_id`); then its state stands.
    """

    def fn(old: dict[str, Any]) -> dict[str, Any]:
        new = {**old, "executor": executor, "attempts": int(old.get("attempts", 0)) + 1,
               "submitted_at": time.time()}
        if job_id is not None:
            new["job_ids"] = [*old.get("job_ids", []), str(job_id)]
        if job_id is None or old.get("job_id") != str(job_id):
            new.update(state="pending", reason=None)
        return new

    return _update(run, fn)


def record_requeue(run: RunDir, reason: str,
                   job_id: str | None = None) -> dict[str, Any]:
    """A preempted or timed-out job goes back to the queue: one more attempt."""

    def fn(old: dict[str, Any]) -> dict[str, Any]:
        new = {**old, "state": "pending", "reason": reason,
               "attempts": int(old.get("attempts", 0)) + 1}
        if job_id is not None:  # this requeue is counted; record_start must not count it again
            counted = dict(old.get("requeues_counted", {}))
            counted[str(job_id)] = counted.get(str(job_id), 0) + 1
            new["requeues_counted"] = counted
        return new

    return _update(run, fn)


def record_start(run: RunDir, job_id: str | None,
                 restarts: int = 0) -> dict[str, Any]:
    """The job starts running. `restarts` is SLURM_RESTART_COUNT: a requeue that did not
    pass through `RunJob.checkpoint` (an admin's `scontrol requeue`, a node failure)
    still counts as an attempt."""

    def fn(old: dict[str, Any]) -> dict[str, Any]:
        new = {**old, "state": "running", "reason": None, "job_id": job_id}
        counted = dict(old.get("requeues_counted", {}))
        seen = counted.get(str(job_id), 0)
        if restarts > seen:
            new["attempts"] = int(old.get("attempts", 0)) + restarts - seen
            counted[str(job_id)] = restarts
            new["requeues_counted"] = counted
        return new

    return _update(run, fn)


def record_failure(run: RunDir, reason: str) -> dict[str, Any]:
    """The launcher saw the run fail (submission error, worker crash, scheduler kill)."""
    return _update(run, lambda old: {**old, "state": "failed", "reason": reason})

"""Ask the scheduler what became of the job ids recorded in status.json files.

SLURM ids (`123` or array tasks `123_4`) are looked up with one `squeue` call
(jobs still queued or running) and one `sacct` call (finished jobs; needs
slurmdbd, and is skipped when it fails). Local-executor ids look like
`local:<host>:<pid>:<start>` and are alive while that process is: `<start>` is the
process's start time (/proc/PID/stat field 22), so a PID the OS has since given to
another process does not count as alive (ids without it, from version 0.1, are still read).
"""

from __future__ import annotations

import getpass
import re
import shutil
import socket
import subprocess

from moe.errors import MissingResource
from moe.procs import is_same_process_alive, process_start_time

ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING",
                    "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED"})
"""Scheduler states of a job that may still run (PREEMPTED precedes a requeue)."""
LOCAL_ALIVE, LOCAL_GONE = "RUNNING", "GONE"
_SLURM_ID = re.compile(r"^\d+(_\d+)?$")
TIMEOUT_S = 30
EXECUTOR_ENV = "MOE_SWEEP_EXECUTOR"
"""Set to "local" in the environment of local-executor workers."""


class SchedulerError(MissingResource):
    """The scheduler could not be asked about jobs that may still be running."""


def local_job_id(pid: int) -> str:
    start = process_start_time(pid)
    return f"local:{socket.gethostname()}:{pid}" + ("" if start is None else f":{start}")


def is_slurm_id(job_id: str) -> bool:
    return bool(_SLURM_ID.match(job_id))


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Map each known job id to its scheduler state (ids the scheduler forgot are absent)."""
    states = {j: _local_state(j) for j in job_ids if j.startswith("local:")}
    slurm_ids = sorted({j for j in job_ids if is_slurm_id(j)})
    if slurm_ids:
        states.update(_sacct(slurm_ids))
        states.update(_squeue(slurm_ids))  # the live queue wins over accounting
    return states


def _local_state(job_id: str) -> str:
    _, host, pid, *start = job_id.split(":")
    if host != socket.gethostname() or not pid.isdigit() or not all(s.isdigit() for s in start):
        return LOCAL_GONE
    alive = is_same_process_alive(int(pid), int(start[0]) if start else None)
    return LOCAL_ALIVE if alive else LOCAL_GONE


def _squeue(job_ids: list[str]) -> dict[str, str]:
    """States of this user's queued and running jobs (array tasks expanded with -r)."""
    if shutil.which("squeue") is None:
        raise SchedulerError("squeue not found: cannot check whether jobs "
                             f"{', '.join(job_ids[:5])} are still queued")
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T", "-u", getpass.getuser()]
    out = _run(cmd, required=True)
    wanted = {j.split("_")[0] for j in job_ids}
    states = {}
    for line in out.splitlines():
        job, _, state = line.strip().partition("|")
        if job.split("_")[0] in wanted:
            states[job] = state.strip().upper()
    return states


def _sacct(job_ids: list[str]) -> dict[str, str]:
    """Final states from accounting ({} when sacct is missing or fails)."""
    if shutil.which("sacct") is None:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(bases)],
               required=False)
    states = {}
    for line in out.splitlines():
        job, _, state = line.strip().partition("|")
        if job and "[" not in job:  # "123_[4-7]" are pending tasks, which squeue reports
            states[job] = state.split()[0].upper() if state.strip() else "UNKNOWN"
    return states


def _run(cmd: list[str], *, required: bool) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if required:
            raise SchedulerError(f"{cmd[0]} failed: {exc}") from None
        return ""
    if proc.returncode != 0:
        if required:
            raise SchedulerError(f"{' '.join(cmd[:2])} exited {proc.returncode}: "
                                 f"{proc.stderr.strip()[:200]}")
        return ""
    return proc.stdout

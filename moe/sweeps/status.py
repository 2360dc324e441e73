"""`moe sweep status`: what every run of a sweep directory is doing, and why it failed.

A run's state comes from its files first (result.json = done; status.json's
state, progress, loss and reason) and from the scheduler second: a run whose
status.json still says pending/running but whose job the scheduler reports
cancelled, failed, timed out, or no longer knows, is failed with that reason; so is a
`running` run whose training process is dead (`RunDir.writer`: the PID, start time and host
its writer lock records, checked on this host), whatever started it. A run
whose status.json or result.json cannot be parsed is reported `unreadable` with the
reason, and every other run is reported as usual.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from moe.procs import is_same_process_alive
from moe.rundir import STATES, RunDir, UnreadableRunFile
from moe.sweepdir import RUNS, SweepDir
from moe.sweeps.plan import render_table
from moe.sweeps.scheduler import ACTIVE, LOCAL_ALIVE, LOCAL_GONE, SchedulerError, job_states
from moe.sweeps.spec import SpecError

FORMATS = ("table", "json")
UNREADABLE = "unreadable"
REPORTED_STATES = (*STATES, UNREADABLE)


@dataclass(frozen=True, kw_only=True)
class RunStatus:
    """One run's state as `moe sweep status` reports it."""

    run_id: str
    state: str
    """pending | running | done | failed | unreadable (a run file cannot be parsed)."""
    tokens_done: int | None = None
    tokens_total: int | None = None
    last_loss: float | None = None
    attempts: int = 0
    """Submissions plus requeues."""
    job_id: str | None = None
    """The latest scheduler job id."""
    scheduler_state: str | None = None
    """What the scheduler says about job_id (None when not asked or unknown)."""
    reason: str | None = None
    """Why the run failed (or was requeued)."""

    @property
    def progress(self) -> float | None:
        if self.tokens_done is None or not self.tokens_total:
            return None
        return self.tokens_done / self.tokens_total


def run_dirs(sweep: SweepDir) -> list[RunDir]:
    """The run directories of a sweep (those with a config.toml), sorted by run id."""
    if not sweep.has_runs():
        raise SpecError(f"{sweep.path} is not a sweep directory (no {RUNS}/); "
                        "create one with `moe sweep launch`")
    return sweep.runs()


def status(sweep: SweepDir | str | os.PathLike, *, ask_scheduler: bool = True
           ) -> list[RunStatus]:
    """Every run's status; the scheduler is asked about unfinished runs' last job ids."""
    runs = run_dirs(sweep if isinstance(sweep, SweepDir) else SweepDir(sweep))
    records = {run: read_run_files(run) for run in runs}
    pending_ids = [_last_job(r) for run, r in records.items() if isinstance(r, dict)
                   and not run.is_done() and r.get("state") in ("pending", "running")]
    sched = None
    if ask_scheduler:
        try:
            sched = job_states([j for j in pending_ids if j])
        except SchedulerError:
            sched = None  # report what the files say; launch refuses in this case
    return [RunStatus(run_id=run.name, state=UNREADABLE, reason=records[run])
            if isinstance(records[run], str) else run_status(run, records[run], sched)
            for run in runs]


def read_run_files(run: RunDir) -> dict[str, Any] | str:
    """A run's status.json, after checking its result.json parses; else why it cannot be read."""
    try:
        run.read_result()
        return run.read_status()
    except (UnreadableRunFile, OSError) as exc:
        return f"{exc}; move it away and relaunch (the run resumes from its checkpoints)"


def run_status(run: RunDir, record: dict[str, Any], sched: dict[str, str] | None
               ) -> RunStatus:
    """Combine a run's files with the scheduler's view of its last job (None: not asked)."""
    job = _last_job(record)
    fields = dict(run_id=run.name, tokens_done=record.get("tokens_done"),
                  tokens_total=record.get("tokens_total"), last_loss=record.get("last_loss"),
                  attempts=int(record.get("attempts", 0)), job_id=job,
                  scheduler_state=sched.get(job) if job and sched else None)
    if run.is_done():
        return RunStatus(**fields, state="done")
    state = record.get("state", "pending")
    state = state if state in STATES else "failed"
    reason = record.get("reason")
    if state == "done":  # status says done but there is no result.json
        state, reason = "failed", "status.json says done but result.json is missing"
    if state in ("pending", "running") and job and sched is not None:
        state, reason = _reconcile(state, reason, job, sched.get(job))
    gone = _writer_gone(run) if state == "running" else None
    if gone:  # whatever the files or the scheduler say, its process has died
        state, reason = "failed", gone
    return RunStatus(**fields, state=state, reason=reason)


def _writer_gone(run: RunDir) -> str | None:
    """Why the process recorded as training `run` is known to be dead; None when it is alive,
    none is recorded, or it ran on another host (the scheduler answers for those)."""
    writer = run.writer()
    if writer is None:
        return None
    pid, start, host = writer
    if host != socket.gethostname() or is_same_process_alive(pid, start):
        return None
    return (f"its training process {pid} on {host} is gone without marking the run "
            "(killed); relaunch to resume from its last checkpoint")


def _reconcile(state: str, reason: str | None, job: str, sched_state: str | None
               ) -> tuple[str, str | None]:
    if sched_state is None:
        return "failed", f"job {job} is no longer known to the scheduler and left no result"
    if sched_state in ACTIVE or sched_state == LOCAL_ALIVE:
        return ("pending" if sched_state in ("PENDING", "REQUEUED") else state), reason
    if sched_state == LOCAL_GONE:
        return "failed", reason or f"worker process {job} is gone and left no result"
    if sched_state == "COMPLETED":
        return "failed", reason or f"job {job} completed without writing result.json"
    return "failed", reason or f"job {job} ended {sched_state}"


def _last_job(record: dict[str, Any]) -> str | None:
    ids = record.get("job_ids") or []
    return str(ids[-1]) if ids else None


# --------------------------------------------------------------------------- output


def counts(runs: list[RunStatus]) -> dict[str, int]:
    c = Counter(r.state for r in runs)
    return {s: c.get(s, 0) for s in REPORTED_STATES if s in STATES or c.get(s)}


def format_status(runs: list[RunStatus], fmt: str = "table") -> str:
    """A table with per-state counts, or a JSON list of runs (run_id, state, ...)."""
    if fmt not in FORMATS:
        raise SpecError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps([asdict(r) | {"progress": r.progress} for r in runs], indent=2) + "\n"
    header = ["run_id", "state", "progress", "loss", "attempts", "job_id", "reason"]
    body = [[r.run_id, r.state, _progress(r), _num(r.last_loss), str(r.attempts),
             r.job_id or "-", (r.reason or "")[:80]] for r in runs]
    summary = ", ".join(f"{n} {s}" for s, n in counts(runs).items())
    return render_table(header, body) + f"{len(runs)} runs: {summary}\n"


def _progress(r: RunStatus) -> str:
    if r.progress is None:
        return "-"
    return f"{r.tokens_done}/{r.tokens_total} ({100 * r.progress:.0f}%)"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"

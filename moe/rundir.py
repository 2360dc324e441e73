"""`RunDir`: the one owner of a run directory's files (docs/architecture.md, "Run directory").

```
RUN_DIR/config.toml    the resolved run config (reproduces the run alone)
       /status.json    state (pending|running|done|failed), reason, progress, job ids, attempts
       /metrics.jsonl  one JSON object per logged step
       /checkpoints/   step-NNNNNNNN.pt (+ .sha256), written atomically
       /snapshots/     step-NNNNNNNN.pt weights only, every train.save_every (for `moe merge`)
       /ema/           the EMA weights as a run directory of their own (train.ema_decay > 0)
       /eval.json      task results
       /result.json    one flat record: config keys, counts, final metrics
       /.train.lock    held (flock) by the one process training the run; holds its PID
       /export-hf/     the transformers export `moe eval --harness` runs (cached)
       /harness.json   lm-evaluation-harness results
       /tb/            TensorBoard events ([log] tracker = "tensorboard")
       /worker.log     output of the `local` executor's worker process
```

The training loop, the evaluator and the sweep launcher call this class and never
build a run's paths themselves; a sweep's directory is `moe.sweepdir.SweepDir`'s. Its invariants:

- every file is written atomically (temp file, fsync, rename: `moe.io`), so a
  reader never sees half a file;
- status.json, eval.json and result.json are changed by locked read-modify-writes,
  so a launcher and its job never lose each other's fields;
- a resume truncates metrics.jsonl to the checkpoint it resumes from, and an append
  after a torn last line starts a new line;
- a checkpoint's SHA-256 is written (atomically) before its data is renamed into
  place, so a checkpoint without a matching digest is never trusted;
- one process at a time trains a run (`RunDir.writer_lock`);
- a run is finished exactly when result.json exists.

This module imports no torch: checkpoints are written as bytes here and
(de)serialised by `moe.checkpoint`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe.errors import BadInput, MissingResource
from moe.io import (
    append_line,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    update_json,
)
from moe.procs import process_start_time

CONFIG = "config.toml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval.json"
SNAPSHOTS = "snapshots"
EMA = "ema"
RESULT = "result.json"
EXPORT_HF = "export-hf"
HARNESS = "harness.json"
TENSORBOARD = "tb"
WORKER_LOG = "worker.log"

WRITER_LOCK = ".train.lock"

STATES = ("pending", "running", "done", "failed")
_CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")
STALE_TMP_S = 3600.0
"""Age after which a leftover `*.tmp` file of an interrupted atomic write is deleted."""


class UnreadableRunFile(BadInput):
    """A run file exists but cannot be parsed (damaged, or not what the toolkit writes)."""


class RunLocked(MissingResource):
    """Another process is training this run directory."""


def _read_run_json(path: Path, default: Any) -> Any:
    """read_json, with every way a damaged file can fail turned into UnreadableRunFile."""
    try:
        return read_json(path, default=default)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
        raise UnreadableRunFile(f"{path.name} is unreadable: {what} ({path})") from None
_SHARDED = re.compile(r"^step-(\d{8})\.dcp$")


class RunDir:
    """The files of one run, at `path` (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._verified: dict[Path, tuple[int, int]] = {}
        """Checkpoints this object wrote or verified, by (size, mtime_ns): pruning after each
        save need not hash multi-GB files again."""

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        """The directory's name: the run id for a run of a sweep."""
        return self.path.name

    # ------------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def status_path(self) -> Path:
        return self.path / STATUS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def eval_path(self) -> Path:
        return self.path / EVAL

    @property
    def result_path(self) -> Path:
        return self.path / RESULT

    @property
    def hf_export_dir(self) -> Path:
        return self.path / EXPORT_HF

    @property
    def harness_path(self) -> Path:
        return self.path / HARNESS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def worker_log_path(self) -> Path:
        return self.path / WORKER_LOG

    # ------------------------------------------------------------------ config

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self):
        """The run's resolved `RunConfig`; ValueError when this is not a run directory."""
        from moe.config import load_config

        if not self.has_config():
            raise BadInput(f"{self.path} is not a run directory (no {CONFIG})")
        return load_config(self.config_path)

    def write_config(self, cfg) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, cfg.to_toml())

    # ------------------------------------------------------------------ status

    def read_status(self) -> dict[str, Any]:
        """status.json as a dict ({} when absent); UnreadableRunFile when damaged."""
        status = _read_run_json(self.status_path, default={}) or {}
        if not isinstance(status, dict):
            raise UnreadableRunFile(f"status.json is not an object ({self.status_path})")
        return status

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json under a lock; stamps `updated_at` and `host`."""
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"status state must be one of {STATES}, got {state!r}")
        return self.edit_status(lambda old: {**old, **fields})

    def edit_status(self, fn) -> dict[str, Any]:
        """Locked read-modify-write of status.json with `fn(old) -> new`."""
        def stamped(old: dict[str, Any]) -> dict[str, Any]:
            new = fn(old)
            new["updated_at"] = time.time()
            new.setdefault("host", socket.gethostname())
            return new

        return update_json(self.status_path, stamped)

    # ------------------------------------------------------------------ metrics

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row; after a torn last line (a crash mid-write) start a new line,
        so the torn fragment cannot swallow this row."""
        line = json.dumps(row, allow_nan=True)
        if not _ends_with_newline(self.metrics_path):
            line = "\n" + line
        append_line(self.metrics_path, line)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after `step` (a run that died before its next checkpoint)."""
        rows = self.read_metrics()
        keep = [r for r in rows if r.get("step", 0) <= step]
        torn = not _ends_with_newline(self.metrics_path)
        if len(keep) != len(rows) or torn:
            atomic_write_text(self.metrics_path,
                              "".join(json.dumps(r, allow_nan=True) + "\n" for r in keep))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:08d}.pt"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file, newest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if (m := _CHECKPOINT.match(p.name))]
        return sorted(found, reverse=True)

    def write_checkpoint(self, step: int, data: bytes, digest: str) -> Path:
        """Store checkpoint bytes and their SHA-256, each atomically, the digest FIRST: a
        crash between the two leaves a digest without data (ignored), never data without
        a digest, and a half-replaced pair fails verification."""
        return self._write_verified(self.checkpoint_path(step), data, digest)

    def _write_verified(self, path: Path, data: bytes, digest: str) -> Path:
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{path.name}: digest does not match the data")
        atomic_write_text(path.with_suffix(".sha256"), digest + "\n")
        atomic_write_bytes(path, data)
        self._remember_verified(path)
        return path

    def _remember_verified(self, path: Path) -> None:
        st = path.stat()
        self._verified[path] = (st.st_size, st.st_mtime_ns)

    def read_checkpoint(self, path: Path) -> bytes:
        """The bytes of a checkpoint whose SHA-256 matches its digest file; ValueError otherwise."""
        digest_path = path.with_suffix(".sha256")
        if not digest_path.is_file():
            raise ValueError("no .sha256 digest beside it (unverifiable)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest_path.read_text().strip():
            raise ValueError("checksum mismatch")
        return data

    def is_verified(self, path: Path) -> bool:
        """The checkpoint matches its digest (files this object wrote or checked, unchanged
        since, are not hashed again)."""
        try:
            st = path.stat()
            if self._verified.get(path) == (st.st_size, st.st_mtime_ns):
                return True
            self.read_checkpoint(path)
        except (OSError, ValueError):
            return False
        self._remember_verified(path)
        return True

    def prune_checkpoints(self, keep: int) -> None:
        """Keep the newest `keep` VERIFIED checkpoints; delete every checkpoint older than
        the oldest kept one (verified or not) and digests left without data. Newer
        unverifiable ones stay (a resume skips them; the next save at that step replaces them).
        """
        kept: list[int] = []
        for step, path in self.list_checkpoints():
            if len(kept) < keep:
                if self.is_verified(path):
                    kept.append(step)
                continue
            path.unlink(missing_ok=True)
            path.with_suffix(".sha256").unlink(missing_ok=True)
        if len(kept) == keep and self.checkpoints_dir.is_dir():
            for digest in self.checkpoints_dir.glob("step-*.sha256"):
                m = re.match(r"^step-(\d{8})\.sha256$", digest.name)
                if m and int(m.group(1)) < kept[-1] and not digest.with_suffix(".pt").exists():
                    digest.unlink(missing_ok=True)

    # Sharded checkpoints (torch.distributed.checkpoint, `moe.checkpoint_dcp`): a directory
    # step-NNNNNNNN.dcp per step, written under a temporary name and renamed when complete.

    def sharded_checkpoint_path(self, step: int, *, partial: bool = False) -> Path:
        return self.checkpoints_dir / f"step-{step:08d}.dcp{'.partial' if partial else ''}"

    def list_sharded_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete sharded checkpoint, newest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if (m := _SHARDED.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def publish_sharded_checkpoint(self, step: int, keep: int) -> Path:
        """Rename a fully written sharded checkpoint into place; keep the newest `keep`."""
        import shutil

        final = self.sharded_checkpoint_path(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.sharded_checkpoint_path(step, partial=True), final)
        for _, old in self.list_sharded_checkpoints()[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ merge snapshots, EMA

    @property
    def snapshots_dir(self) -> Path:
        return self.path / SNAPSHOTS

    def snapshot_path(self, step: int) -> Path:
        return self.snapshots_dir / f"step-{step:08d}.pt"

    def list_snapshots(self) -> list[tuple[int, Path]]:
        """(step, path) of every weights snapshot kept for merging, oldest first."""
        if not self.snapshots_dir.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.snapshots_dir.iterdir()
                      if (m := _CHECKPOINT.match(p.name)))

    def write_snapshot(self, step: int, data: bytes, digest: str) -> Path:
        """Store snapshot bytes and their SHA-256 like a checkpoint's (never pruned)."""
        return self._write_verified(self.snapshot_path(step), data, digest)

    def ema_run(self) -> RunDir:
        """The EMA weights of this run, stored as a run directory `moe eval` accepts."""
        return RunDir(self.path / EMA)

    # ------------------------------------------------------------------ eval and result

    def is_done(self) -> bool:
        """A run is finished when its result.json exists."""
        return self.result_path.is_file()

    def read_result(self) -> dict[str, Any] | None:
        """result.json (None when absent); UnreadableRunFile when damaged."""
        result = _read_run_json(self.result_path, default=None)
        if result is not None and not isinstance(result, dict):
            raise UnreadableRunFile(f"result.json is not an object ({self.result_path})")
        return result

    def write_result(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.result_path, record)

    def read_eval(self) -> dict[str, Any]:
        return read_json(self.eval_path, default={}) or {}

    def merge_eval(self, results: dict[str, dict[str, Any]], flat: dict[str, Any],
                   step: int | None = None) -> Path:
        """Merge task results into eval.json, and their flat columns into result.json if the
        run is finished (a finished run gains the columns of newly evaluated tasks)."""
        record = {"tasks": results, **({} if step is None else {"step": step})}
        update_json(self.eval_path,
                    lambda old: {**old, **record, "tasks": {**old.get("tasks", {}), **results}})
        if self.is_done():
            update_json(self.result_path, lambda old: {**old, **flat})
        return self.eval_path


    # ------------------------------------------------------------------ one writer

    @property
    def writer_lock_path(self) -> Path:
        return self.path / WRITER_LOCK

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold an exclusive flock on RUN_DIR/.train.lock for the block; the OS drops it when
        the process dies, so a killed writer never blocks the next. A second writer gets
        RunLocked naming the holder's PID at once."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.writer_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("ascii", "replace").split()
                pid = holder[0] if holder else "unknown"
                raise RunLocked(f"{self.path} is being trained by process {pid} (lock "
                                f"{self.writer_lock_path}); wait for it or stop it first") from None
            me = f"{os.getpid()} {process_start_time(os.getpid()) or 0} " \
                 f"{socket.gethostname()}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, me, 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def writer(self) -> tuple[int, int | None, str | None] | None:
        """(PID, start time, host) of the process `writer_lock` records as training this run;
        None when no process holds it (the file is emptied on release). A writer killed
        outright (SIGKILL, the OOM killer, a lost node) leaves its record behind, which is
        how `moe sweep status` tells a dead run from a running one."""
        try:
            fields = self.writer_lock_path.read_text(encoding="ascii", errors="replace").split()
        except OSError:
            return None
        if not fields or not fields[0].isdigit():
            return None
        start = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() and \
            fields[1] != "0" else None
        return int(fields[0]), start, (fields[2] if len(fields) > 2 else None)

    # ------------------------------------------------------------------ housekeeping

    def clean_stale_tmp(self, max_age_s: float = STALE_TMP_S) -> list[Path]:
        """Delete `*.tmp` leftovers of interrupted atomic writes older than `max_age_s`."""
        return clean_stale_tmp([self.path, self.checkpoints_dir], max_age_s)


def clean_stale_tmp(directories: list[Path], max_age_s: float = STALE_TMP_S) -> list[Path]:
    """Delete `.*.tmp` files (moe.io's temporary names) older than `max_age_s` in `directories`."""
    removed, cutoff = [], time.time() - max_age_s
    for directory in directories:
        if not directory.is_dir():
            continue
        for tmp in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def _ends_with_newline(path: Path) -> bool:
    """True for an absent or empty file, or one whose last byte is a newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


# Module-level helpers for callers that hold a plain path (the sweep launcher's loops).

def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    return RunDir(run_dir).read_status()


def update_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    return RunDir(run_dir).update_status(**fields)


def is_done(run_dir: str | os.PathLike) -> bool:
    return RunDir(run_dir).is_done()


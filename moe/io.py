"""Atomic file writes and a locked read-modify-write for small JSON files.

Every file the toolkit writes goes through here, so a reader (a status poll, a
collect, a resumed job) never sees half a file: the bytes go to a temporary
file in the same directory, are fsynced, and the temporary file is renamed over
the target, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_with_path(exc, path)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Read a JSON file; return `default` when it does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync: used for metrics.jsonl, one JSON object per line.

    A crash can leave at most a partial last line, which readers skip.
    """
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        _raise_with_path(exc, path)
        raise


def _raise_with_path(exc: BaseException, path: str | os.PathLike) -> None:
    """Re-raise an OSError that lost its file name (ENOSPC from write/fsync) with `path`."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive `flock` on `path` (created if needed) for the block.

    Yields True when the lock is held; with `blocking=False` yields False at
    once if another process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(f.fileno(), flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def update_json(path: str | os.PathLike, fn: Callable[[dict], dict]) -> dict:
    """Locked read-modify-write of a JSON object file; returns the new object.

    Several processes (a launcher and the job it started) may update the same
    status.json; the lock file beside it serialises them.
    """
    path = Path(path)
    with file_lock(path.with_name(path.name + ".lock")):
        new = fn(dict(read_json(path, default={}) or {}))
        atomic_write_json(path, new)
    return new


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, skipping a torn or malformed line (e.g. after a crash)."""
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    rows.append(obj)
    except FileNotFoundError:
        pass
    return rows


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

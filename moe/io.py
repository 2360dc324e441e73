"""Atomic file writes and a locked read-modify-write for small JSON files.

Every file the toolkit writes goes through here, so a reader (a status poll, a
collect, a resumed job) never sees half a file: the bytes go to a temporary
file in the same directory, are fsynced, and the temporary file is renamed over
the target, which POSIX makes atomic. The file gets the mode `open()` would give it
(0666 less the process's umask), not the 0600 of a temporary file, so a colleague or a
server running as another user reads what the umask lets them read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from moe.errors import BadInput


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc, 4.7+);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode POSIX `open(path, O_CREAT, 0o666)` gives a new file: 0666 & ~umask."""
    return 0o666 & ~current_umask()


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


OUTPUT_MARKER = ".moe-output.json"
"""Written by `claim_output_dir` into each directory a command made: which command, from what."""


class OutputDirNotEmpty(BadInput):
    """An output directory holds files that the command did not write (exit 2)."""


def check_output_dir(path: str | os.PathLike, command: str, *, source: str | None = None,
                     force: bool = False, own_names: Collection[str] = ()) -> Path:
    """Refuse a non-empty `path` unless `command` made it (from `source`) or `force`.

    Commands that write a directory of outputs (export, merge, ensemble, data prepare,
    figures) call this before any work, so nothing mixes with or overwrites files they
    did not write; rerunning the same command on the same source into its own
    directory is allowed. A directory holding only `own_names` (the files the command
    writes, e.g. figure names) counts as its own too.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirNotEmpty(f"{path} is a file, not a directory; choose a directory")
    if force or not path.is_dir() or not any(path.iterdir()):
        return path
    if own_names and all(p.name in own_names or p.name == OUTPUT_MARKER
                         for p in path.iterdir()):
        return path
    try:
        made_by = read_json(path / OUTPUT_MARKER)
    except (ValueError, OSError):
        made_by = None
    if made_by == {"command": command, "source": source}:
        return path
    raise OutputDirNotEmpty(f"{path} is not empty and was not written by `moe {command}`"
                            + (f" of {source}" if source else "") + "; choose a new or empty "
                            "directory, or pass --force to write into it")


def claim_output_dir(path: str | os.PathLike, command: str, *, source: str | None = None,
                     force: bool = False, own_names: Collection[str] = ()) -> Path:
    """`check_output_dir`, then create the directory and mark it as `command`'s."""
    path = check_output_dir(path, command, source=source, force=force, own_names=own_names)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / OUTPUT_MARKER, {"command": command, "source": source})
    return path


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

"""What a failed command prints and exits with: the user's mistake apart from our bug.

`moe.app.cli.main` calls `report` for any exception a command raises. An expected failure
(`moe.errors.UserError` and its kinds, or an operating-system error) is one line,
`error: <what> (<path>)`, and its exit code. Anything else is a bug in the toolkit: exit 70
and one line, `error: internal error: <type>: <what> (a bug; run with MOE_DEBUG=1 and report
it; traceback in <file>)`, with the traceback saved to that file (in $MOE_CRASH_DIR, else
the system's temporary directory). MOE_DEBUG=1 also prints the traceback; it never changes
the exit code. The codes are documented in README.md ("Reliability"):

    0   success
    1   the command ran but some runs failed (`moe sweep launch`)
    2   bad input or bad config: an argument, file, table, spec, profile or config to fix
        (incl. a missing path, a file that already exists, a file nested too deeply)
    3   training failed (diverged: NaN/inf loss); status.json says where and why
    4   permission denied
    5   the disk is full, or another operating-system I/O error
    69  a missing resource: a package (an extra of the install: named with its pip line),
        a GPU, a kernel backend, the scheduler, or a run directory another process trains
    70  internal error: a bug in the toolkit (the traceback is saved to a file)
    129 `moe train` stopped by SIGHUP after a checkpoint (moe.train.signals)
    130 interrupted (Ctrl-C)
    143 `moe train` stopped by SIGTERM after a checkpoint (moe.train.signals)
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from moe.errors import (  # the codes of moe.errors are the command's too
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_MISSING_RESOURCE,
    EXIT_TRAINING_FAILED,  # noqa: F401
    UserError,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = EXIT_BAD_INPUT
EXIT_PERMISSION = 4
EXIT_OS = 5
EXIT_INTERRUPTED = 130
EXIT_SIGHUP = 129  # 128 + the signal number, as a shell reports it: moe.train.signals
EXIT_SIGTERM = 143
CRASH_DIR_ENV = "MOE_CRASH_DIR"
DEBUG_ENV = "MOE_DEBUG"
EXTRAS = {"torch": "train", "submitit": "train"}
"""Packages that only an extra installs (`pip install moe-sparsity` alone plans and analyses)."""


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message without the `error: ` prefix) for `exc`; an internal
    error's message does not yet say where its traceback is (`report` adds it)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, UserError):
        return exc.exit_code, _first_line(exc)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRAS:
        package = exc.name.split(".")[0]
        return EXIT_MISSING_RESOURCE, (f"this command needs {package}, which is not installed: "
                                       f"pip install 'moe-sparsity[{EXTRAS[package]}]'")
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, RecursionError):
        return EXIT_USAGE, "an input file is nested too deeply to read"
    return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {_first_line(exc)}"


def _os_error(exc: OSError) -> tuple[int, str]:
    path = exc.filename if exc.filename is not None else None
    where = f" ({path})" if path is not None else ""
    if isinstance(exc, PermissionError):
        return EXIT_PERMISSION, f"permission denied{where}"
    if isinstance(exc, FileNotFoundError):
        return EXIT_USAGE, f"no such file or directory{where}"
    if isinstance(exc, FileExistsError):
        return EXIT_USAGE, f"already exists; choose another path or remove it{where}"
    if isinstance(exc, (NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, f"{exc.strerror or type(exc).__name__}{where}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EXIT_OS, f"no space left on device: free some space and rerun (it resumes){where}"
    what = exc.strerror or _first_line(exc) or type(exc).__name__
    return EXIT_OS, f"{what}{where}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_traceback(exc: BaseException) -> Path | None:
    """Write `exc`'s traceback to $MOE_CRASH_DIR (else the temporary directory); its path,
    or None when it cannot be written."""
    folder = Path(os.environ.get(CRASH_DIR_ENV) or tempfile.gettempdir())
    path = folder / f"moe-internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    text = "".join(traceback.format_exception(exc))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(f"moe {' '.join(sys.argv[1:])}\n\n{text}", encoding="utf-8")
    except OSError:
        return None
    return path


def report(exc: BaseException) -> int:
    """Print `error: <what>` to stderr (after the traceback under MOE_DEBUG=1); return the
    exit code. An internal error's traceback is also saved to a file the line names."""
    code, message = classify(exc)
    if os.environ.get(DEBUG_ENV) and code != EXIT_INTERRUPTED:
        traceback.print_exception(exc, file=sys.stderr)
    if code == EXIT_INTERNAL:
        saved = save_traceback(exc)
        where = f"traceback in {saved}" if saved else "the traceback could not be saved"
        message += f" (a bug; run with MOE_DEBUG=1 and report it; {where})"
    print(message if code == EXIT_INTERRUPTED else f"error: {message}", file=sys.stderr)
    return code


def format_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for the command line: `warning: <message>` on one line (its
    category and source under MOE_DEBUG=1)."""
    text = " ".join(str(message).split())
    if os.environ.get(DEBUG_ENV):
        text += f" [{category.__name__} at {filename}:{lineno}]"
    return f"warning: {text}\n"

"""Every expected failure of a command as one line, `error: <what> (<path>)`, and an exit code.

`moe.app.cli.main` calls `report` for any exception a command raises (unless
MOE_DEBUG=1, which shows the traceback instead). The codes are documented in
README.md ("Reliability"):

    0  success
    1  the command ran but some runs failed (`moe sweep launch`), or an internal error
    2  bad input: a config, spec, profile, argument or file to fix (incl. missing files,
       a run directory another process is training, a file that already exists)
    3  training failed (diverged: NaN/inf loss); status.json says where and why
    4  permission denied
    5  the disk is full, or another operating-system I/O error
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import errno
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TRAINING_FAILED = 3
EXIT_PERMISSION = 4
EXIT_OS = 5
EXIT_INTERRUPTED = 130
EXTRAS = {"torch": "train", "submitit": "train"}
"""Packages that only an extra installs (`pip install moe-sparsity` alone plans and analyses)."""


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message without the `error: ` prefix) for `exc`."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    loop = sys.modules.get("moe.train.loop")  # imported only by commands that train
    if loop is not None and isinstance(exc, loop.TrainingFailed):
        return EXIT_TRAINING_FAILED, _first_line(exc)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRAS:
        package = exc.name.split(".")[0]
        return EXIT_USAGE, (f"this command needs {package}, which is not installed: "
                            f"pip install 'moe-sparsity[{EXTRAS[package]}]'")
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, ValueError):
        return EXIT_USAGE, _first_line(exc)
    if isinstance(exc, KeyError):
        key = exc.args[0] if exc.args else "?"
        return EXIT_FAILED, f"missing key {key!r} in a file the command read (internal error: " \
                            "KeyError; rerun with MOE_DEBUG=1 for the traceback)"
    if isinstance(exc, RecursionError):
        return EXIT_USAGE, "an input file is nested too deeply to read"
    return EXIT_FAILED, (f"internal error: {type(exc).__name__}: {_first_line(exc)}; rerun with "
                         "MOE_DEBUG=1 for the traceback")


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


def report(exc: BaseException) -> int:
    """Print `error: <what>` to stderr; return the exit code."""
    code, message = classify(exc)
    print(message if code == EXIT_INTERRUPTED else f"error: {message}", file=sys.stderr)
    return code

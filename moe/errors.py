"""The errors a user can act on, apart from our bugs.

Every failure the toolkit expects derives from `UserError` and carries its exit code; the
`moe` command prints it as one line, `error: <what>`, and exits with that code
(`moe.app.errors`). Anything else reaching the command line is a bug in the toolkit: exit
70 and "internal error: ... (a bug; ...)", never a message that blames the user's input.

    BadInput         2   an argument, file, table or run directory to fix
    TrainingFailed   3   the run diverged (`moe.train.loop`); status.json says where
    BadConfig        2   a run config, sweep spec or cluster profile to fix
    MissingResource  69  something the machine lacks or another process holds: a package,
                         a GPU, a kernel backend, the scheduler, a run being trained

The classes derive from ValueError, as the errors they replace did, so callers that catch
those keep working; what the command line does with them depends on `UserError` alone.
This module is at the bottom layer so that every layer may raise them.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 3
EXIT_MISSING_RESOURCE = 69
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE


class UserError(Exception):
    """A failure the user can fix or wait out; `exit_code` is what the command exits with."""

    exit_code = EXIT_BAD_INPUT


class BadInput(UserError, ValueError):
    """An argument, a file, a table or a run directory is not what the command needs."""

    exit_code = EXIT_BAD_INPUT


class BadConfig(UserError, ValueError):
    """A run config, a sweep spec or a cluster profile asks for something invalid."""

    exit_code = EXIT_BAD_INPUT


class MissingResource(UserError, ValueError):
    """The machine lacks something the command needs (a package, a GPU, a kernel backend,
    the scheduler), or another process holds it (a run being trained, a launch lock)."""

    exit_code = EXIT_MISSING_RESOURCE

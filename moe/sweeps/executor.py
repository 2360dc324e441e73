"""How a launch starts its runs: one small interface, one module per executor.

    local  `moe.sweeps.local`  worker processes on this machine, `max_parallel` at a time;
                               waits for the runs
    debug  `moe.sweeps.debug`  in this process, one run after another (for pdb); waits
    slurm  `moe.sweeps.slurm`  one submitit job array per planned node count; returns
                               the job ids at once

`make_executor` checks the options before anything is planned or written; the launcher
then hands the executor the runs to start (`Executor.start`). Adding an executor is one
module with one `Executor` subclass and one line in `_MODULES`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from moe.errors import BadInput

if TYPE_CHECKING:
    from moe.rundir import RunDir
    from moe.sweepdir import SweepDir
    from moe.sweeps.plan import RunPlan
    from moe.sweeps.profile import ClusterProfile

_MODULES = {"local": "moe.sweeps.local", "debug": "moe.sweeps.debug",
            "slurm": "moe.sweeps.slurm"}
EXECUTORS = tuple(_MODULES)
SWEEP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class LaunchError(BadInput):
    """A launch cannot go ahead (locked directory, scheduler unreachable, submission failed)."""


@dataclass(frozen=True, kw_only=True)
class Started:
    """What an executor did with the runs it was given."""

    job_ids: dict[str, str] = field(default_factory=dict)
    """run_id -> scheduler job id (executors that submit)."""
    final_states: dict[str, str] = field(default_factory=dict)
    """run_id -> done | failed (executors that wait for the runs)."""


class Executor(ABC):
    """Starts the training jobs of run directories; each records its submissions in the
    runs' status.json (`moe.sweeps.records`)."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    """Packages it needs (an extra of the install), checked before anything is written."""

    @classmethod
    @abstractmethod
    def from_options(cls, *, max_parallel: int, progress: bool, profile: ClusterProfile | None,
                     sweep_name: str) -> Executor:
        """This executor for a launch's options; LaunchError when they do not apply to it."""

    @abstractmethod
    def start(self, runs: list[RunDir], sweep: SweepDir, plans: dict[str, RunPlan]) -> Started:
        """Start `runs` (of `sweep`; `plans` by run directory name)."""


def make_executor(name: str, *, max_parallel: int = 2, progress: bool = True,
                  profile: ClusterProfile | None = None, sweep_name: str = "sweep") -> Executor:
    """The executor called `name` for these options (checked here, before any planning,
    with the packages it needs)."""
    if name not in _MODULES:
        raise LaunchError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    if profile is not None and name != "slurm":
        raise LaunchError("--cluster applies to the slurm executor only")
    executor = importlib.import_module(_MODULES[name]).EXECUTOR
    for package in executor.needs:
        if importlib.util.find_spec(package) is None:  # the CLI names the extra to install
            raise ModuleNotFoundError(f"No module named '{package}'", name=package)
    return executor.from_options(max_parallel=max_parallel, progress=progress,
                                        profile=profile, sweep_name=check_sweep_name(sweep_name))


def check_sweep_name(name: str) -> str:
    """The sweep name goes into job names and the batch script: [A-Za-z0-9._-] only."""
    if not isinstance(name, str) or not SWEEP_NAME.match(name):
        raise LaunchError(f"sweep name {name!r} may hold only letters, digits, '.', '_' and '-' "
                          "(1 to 100 of them); rename it in the spec")
    return name

"""The `debug` executor: train each run in this process, one after another, so a debugger
(pdb, a profiler) sees the training job itself."""

from __future__ import annotations

from dataclasses import dataclass

from moe.rundir import RunDir
from moe.sweepdir import SweepDir
from moe.sweeps.executor import Executor, Started
from moe.sweeps.records import record_failure, record_submission


@dataclass(frozen=True)
class DebugExecutor(Executor):
    name = "debug"
    needs = ("torch",)

    @classmethod
    def from_options(cls, **_options) -> DebugExecutor:
        return cls()

    def start(self, runs: list[RunDir], sweep: SweepDir, plans: dict) -> Started:
        return Started(final_states=run_debug(runs))


EXECUTOR = DebugExecutor


def run_debug(runs: list[RunDir]) -> dict[str, str]:
    """Train each run in this process; {run_id: done | failed}."""
    from moe.sweeps.job import run_in_dir
    from moe.train import TrainingFailed

    final = {}
    for run in runs:
        record_submission(run, "debug")
        try:
            run_in_dir(run)
        except TrainingFailed:
            pass  # recorded in status.json; go on with the other runs
        except Exception as exc:
            record_failure(run, f"{type(exc).__name__}: {exc}"[:500])
        final[run.name] = "done" if run.is_done() else "failed"
    return final

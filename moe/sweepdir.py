"""`SweepDir`: the one owner of a sweep directory's files (docs/architecture.md, "Sweep
directory"), as `RunDir` is of a run's.

```
SWEEP_DIR/sweep.toml       the spec of the last launch (its `name` groups tracker runs)
         /runs/<run_id>/   one run directory per planned run (`RunDir`)
         /recipes/<name>/  outputs of `moe merge` / `moe ensemble` kept beside the runs
                           (apart from runs/, so they never enter the sweep's own fits)
         /results.parquet  the results table (`moe sweep collect`; schema: `moe.record`)
         /report.md        `moe report` / `moe demo` output, with figures/
         /.launch.lock     held (flock) by the one `moe sweep launch` working here
         /slurm/<job id>/  submitit's batch scripts and job logs (slurm executor)
```

The launcher, the executors, status, collect, the tracker and the analysis readers take a
`SweepDir` (or the `RunDir`s it hands out) and never build these paths themselves
(tests/test_sweepdir.py greps the package for it). Torch-free, like `moe.rundir`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from moe.io import atomic_write_text, file_lock
from moe.rundir import CONFIG, RESULT, RunDir, clean_stale_tmp

SPEC = "sweep.toml"
RUNS = "runs"
RECIPES = "recipes"
RESULTS = "results.parquet"
REPORT = "report.md"
FIGURES = "figures"
LAUNCH_LOCK = ".launch.lock"
SLURM_LOGS = "slurm"


class SweepDir:
    """The files of one sweep, at `path` (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SweepDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SweepDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @classmethod
    def of_run(cls, run: RunDir) -> SweepDir | None:
        """The sweep holding `run` at SWEEP_DIR/runs/<run_id> (with a sweep.toml), else None."""
        sweep = cls(run.path.parent.parent)
        if run.path.parent.name != RUNS or not sweep.spec_path.is_file():
            return None
        return sweep

    # ------------------------------------------------------------------ paths

    @property
    def spec_path(self) -> Path:
        return self.path / SPEC

    @property
    def runs_path(self) -> Path:
        return self.path / RUNS

    @property
    def recipes_path(self) -> Path:
        return self.path / RECIPES

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES

    @property
    def launch_lock_path(self) -> Path:
        return self.path / LAUNCH_LOCK

    @property
    def slurm_logs_dir(self) -> Path:
        """submitit's folder: one subfolder per job id."""
        return self.path / SLURM_LOGS

    @property
    def slurm_job_folder(self) -> Path:
        """submitit's `folder` template: SWEEP_DIR/slurm/<job id> ("%j")."""
        return self.slurm_logs_dir / "%j"

    # ------------------------------------------------------------------ the spec

    def write_spec(self, toml_text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.spec_path, toml_text)

    def name(self) -> str:
        """The spec's `name` (the directory's name when the spec has none)."""
        from moe.config import read_toml

        return str(read_toml(self.spec_path).get("name") or self.path.name)

    # ------------------------------------------------------------------ runs and recipes

    def run(self, run_id: str) -> RunDir:
        """The run directory of `run_id` (which need not exist yet)."""
        return RunDir(self.runs_path / run_id)

    def has_runs(self) -> bool:
        return self.runs_path.is_dir()

    def runs(self) -> list[RunDir]:
        """The run directories holding a config.toml, sorted by run id ([] without runs/)."""
        if not self.has_runs():
            return []
        return [RunDir(p) for p in sorted(self.runs_path.iterdir()) if (p / CONFIG).is_file()]

    def recipes(self) -> list[RunDir]:
        """SWEEP_DIR/recipes/*/ that hold a result.json."""
        if not self.recipes_path.is_dir():
            return []
        return [RunDir(p) for p in sorted(self.recipes_path.iterdir()) if (p / RESULT).is_file()]

    # ------------------------------------------------------------------ one launcher

    @contextlib.contextmanager
    def launch_lock(self) -> Iterator[bool]:
        """Hold SWEEP_DIR/.launch.lock for the block; yields False at once when another
        launch holds it (the OS drops the lock when its holder dies)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with file_lock(self.launch_lock_path, blocking=False) as held:
            yield held

    def clean_stale_tmp(self) -> list[Path]:
        """Delete stale `*.tmp` leftovers of interrupted atomic writes in the directory."""
        return clean_stale_tmp([self.path])

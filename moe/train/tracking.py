"""Experiment trackers: the rows of metrics.jsonl, also sent to TensorBoard, W&B or trackio.

`[log] tracker = "none" | "tensorboard" | "wandb" | "trackio"`. One tracker run per run
directory (a resumed run continues it), named by the run directory and, for a run of
a sweep, grouped by the sweep's name. Each package is imported only when chosen; a
missing one is a one-line error naming what to install. Every numeric field of a
metrics row is logged at its `step` (lists per layer as `name/<i>`, periodic task
results as `task/<name>/<metric>`); `step`, `steps_total` and `time` are not.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from typing import Any

from moe.config import RunConfig
from moe.config.schema import LogConfig
from moe.errors import MissingResource
from moe.rundir import RunDir
from moe.sweepdir import SweepDir

_SKIP = frozenset({"step", "steps_total", "time"})
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row, flattened to tracker names."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _SKIP:
            continue
        if key == "eval" and isinstance(value, dict):
            for task, metrics in value.items():
                out.update({f"task/{task}/{k}": float(v) for k, v in metrics.items()
                            if _is_number(v)})
        elif isinstance(value, list):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value) if _is_number(v)})
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Tracker:
    """No tracker (`none`): the interface the training loop calls."""

    def log(self, row: dict[str, Any]) -> None:
        """Send one metrics.jsonl row."""

    def close(self) -> None:
        """Flush and finish."""


class TensorBoardTracker(Tracker):
    def __init__(self, run: RunDir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.tensorboard_dir))

    def log(self, row: dict[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["step"]))
        self.writer.flush()  # a killed job keeps what it logged

    def close(self) -> None:
        self.writer.close()


class ModuleTracker(Tracker):
    """wandb and trackio share one API: init(project, name, group, config, resume), log, finish."""

    def __init__(self, module, run: RunDir, cfg: RunConfig, group: str | None, **extra):
        self.module = module
        self.run = module.init(project=cfg.log.project, name=run.path.name, group=group,
                               config=cfg.to_dict(), resume="allow", **extra)

    def log(self, row: dict[str, Any]) -> None:
        self.module.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.module.finish()


def sweep_group(run: RunDir, log: LogConfig) -> str | None:
    """log.group, else the sweep's name for a run at SWEEP_DIR/runs/<run_id>."""
    if log.group:
        return log.group
    sweep = SweepDir.of_run(run)
    return None if sweep is None else sweep.name()


def _import(tracker: str):
    package = _PACKAGES[tracker]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingResource(f"log.tracker={tracker!r} needs the {package} package: "
                         f"pip install {package}") from None


def open_tracker(cfg: RunConfig, run: RunDir) -> Tracker:
    """The tracker `cfg.log` asks for, started for this run directory."""
    name = cfg.log.tracker
    if name == "none":
        return Tracker()
    module = _import(name)
    if name == "tensorboard":
        return TensorBoardTracker(run)
    group = sweep_group(run, cfg.log)
    if name == "wandb":  # one W&B run per run directory, continued on resume
        run_key = hashlib.sha256(str(run.path.resolve()).encode()).hexdigest()[:16]
        return ModuleTracker(module, run, cfg, group, id=run_key, dir=str(run.path))
    return ModuleTracker(module, run, cfg, group)

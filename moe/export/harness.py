"""`moe eval RUN_DIR --harness TASKS`: lm-evaluation-harness on the run's transformers export.

The run is exported once to `RUN_DIR/export-hf/` (again only when a newer
checkpoint exists), then lm-eval's `hf` backend evaluates it in this process
(`lm_eval.simple_evaluate`), and the results go to `RUN_DIR/harness.json`.
lm-eval is optional: `pip install 'moe-sparsity[eval]'`. For evaluation at
scale on a GPU, point lm-eval's vLLM backend (or `vllm serve`) at the same
export directory (README, "Evaluation at scale").
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from moe.errors import BadInput, MissingResource
from moe.export.hf import export_hf, exported_step
from moe.io import atomic_write_json
from moe.rundir import RunDir

INSTALL_HINT = "pip install 'moe-sparsity[eval]'"


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingResource(f"--harness needs lm-evaluation-harness: {INSTALL_HINT}")


def cached_export(run_dir: str | os.PathLike) -> Path:
    """RUN_DIR/export-hf, (re)written when it lacks the newest checkpoint."""
    run = RunDir(run_dir)
    checkpoints = run.list_checkpoints()
    if not checkpoints:
        raise BadInput(f"{run.path} has no checkpoint to evaluate; train it first")
    if exported_step(run.hf_export_dir) != checkpoints[0][0]:
        export_hf(run.path, run.hf_export_dir)
    return run.hf_export_dir


def harness_args(export_dir: str | os.PathLike, tasks: list[str], *, device: str = "cpu",
                 batch_size: int = 8, limit: int | None = None,
                 num_fewshot: int | None = None) -> dict[str, Any]:
    """Keyword arguments of `lm_eval.simple_evaluate` for the export's `hf` backend."""
    if not tasks:
        raise BadInput("--harness needs task names, e.g. --harness gsm8k,hellaswag")
    return {"model": "hf",
            "model_args": {"pretrained": str(export_dir), "dtype": "float32"},
            "tasks": list(tasks), "device": device, "batch_size": batch_size,
            "limit": limit, "num_fewshot": num_fewshot, "log_samples": False}


def run_harness(run_dir: str | os.PathLike, tasks: list[str], *, device: str = "cpu",
                batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = None,
                include_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Export (cached), evaluate with lm-eval, write RUN_DIR/harness.json; returns its results.

    `include_path`: a directory of extra lm-eval task YAML files (e.g. tasks on local data).
    """
    require_lm_eval()
    kwargs = harness_args(cached_export(run_dir), tasks, device=device, batch_size=batch_size,
                          limit=limit, num_fewshot=num_fewshot)
    import lm_eval

    if include_path is not None:
        from lm_eval.tasks import TaskManager

        kwargs["task_manager"] = TaskManager(include_path=str(include_path))
    out = lm_eval.simple_evaluate(**kwargs)
    results = {"tasks": list(tasks), "results": out["results"] if out else {},
               "config": {k: v for k, v in kwargs.items()
                          if k not in ("model_args", "task_manager")},
               "export_dir": str(kwargs["model_args"]["pretrained"])}
    atomic_write_json(RunDir(run_dir).harness_path, results)
    return results

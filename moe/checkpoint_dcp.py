"""Sharded checkpoints (torch.distributed.checkpoint) of runs trained with FSDP2 / experts.

`RUN_DIR/checkpoints/step-NNNNNNNN.dcp/` holds one file per rank plus DCP's metadata: the
model and optimizer state dicts of `torch.distributed.checkpoint.state_dict.get_state_dict`
(keys are parameter names, values DTensors) and `extra` (step, RNG state, run id). DCP
records every shard by its place in the global tensor, so a checkpoint written on one
layout loads on any other, including a single process without a process group.

Expert-parallel weights are held per rank as E/P experts; `ExpertLayout` tells how to
describe them as the global [E, ...] tensor (DTensor (Shard(0), Shard(0)) over the
("ep", "dp") mesh). A checkpoint is written to `step-N.dcp.partial/` and renamed by rank
0 once every rank has finished, so a half-written one is never loaded.

Single-process runs keep `moe.checkpoint`'s files; `newest_checkpoint` tells which
kind is newest.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe.rundir import RunDir


@dataclass(frozen=True)
class ExpertLayout:
    """How one expert-parallel module's weights sit on the ranks."""

    mesh: Any
    """2-D DeviceMesh ("ep", "dp"): expert blocks over ep, FSDP shards over dp."""
    n_experts: int
    """Experts in the whole layer (E)."""


def newest_checkpoint(run: RunDir) -> tuple[str, int] | None:
    """("pt" | "dcp", step) of the newest checkpoint of either kind; None if none."""
    found = [("pt", s) for s, _ in run.list_checkpoints()[:1]]
    found += [("dcp", s) for s, _ in run.list_sharded_checkpoints()[:1]]
    return max(found, key=lambda kind_step: kind_step[1]) if found else None


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _layout_for(experts: dict[str, ExpertLayout], fqn: str) -> ExpertLayout | None:
    return next((lay for prefix, lay in experts.items() if fqn.startswith(prefix + ".")), None)


def _global_view(value: Any, layout: ExpertLayout | None) -> Any:
    """An expert-parallel shard described as part of the global [E, ...] tensor (same storage)."""
    from torch.distributed.tensor import DTensor, Shard

    if layout is None or not isinstance(value, DTensor) or value.ndim == 0:
        return value
    shape = torch.Size((layout.n_experts, *value.shape[1:]))
    return DTensor.from_local(value.to_local(), layout.mesh, [Shard(0), Shard(0)],
                              run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _state(model: nn.Module, opt: torch.optim.Optimizer | None,
           experts: dict[str, ExpertLayout]) -> tuple[dict, dict | None, dict]:
    """torch's state dicts, and the checkpoint's view of them (same tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if opt is None:
        msd, osd = get_model_state_dict(model), None
    else:
        msd, osd = get_state_dict(model, opt)
    state: dict[str, Any] = {"model": {k: _global_view(v, _layout_for(experts, k))
                                       for k, v in msd.items()}}
    if osd is not None:
        state["optim"] = {
            "state": {fqn: {k: _global_view(v, _layout_for(experts, fqn)) for k, v in s.items()}
                      for fqn, s in osd["state"].items()},
            "param_groups": osd["param_groups"]}
    return msd, osd, state


def save_sharded(run: RunDir, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                 extra: dict[str, Any], experts: dict[str, ExpertLayout], keep: int) -> Path:
    """Every rank writes its shards; rank 0 publishes the directory when all are done."""
    import torch.distributed.checkpoint as dcp

    partial = run.sharded_checkpoint_path(step, partial=True)
    rank0 = not _is_dist() or dist.get_rank() == 0
    if rank0 and partial.exists():
        shutil.rmtree(partial)  # left by a job killed while writing
    if _is_dist():
        dist.barrier()
    _, _, state = _state(model, opt, experts)
    state["extra"] = extra
    dcp.save(state, checkpoint_id=partial)
    if _is_dist():
        dist.barrier()
    if rank0:
        run.publish_sharded_checkpoint(step, keep)
    if _is_dist():
        dist.barrier()
    return run.sharded_checkpoint_path(step)


def load_sharded(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None,
                 experts: dict[str, ExpertLayout], *, alone: bool = False) -> dict[str, Any]:
    """Load a sharded checkpoint into `model` (and `opt`) on any layout; returns its extra.

    Every rank of the job calls it, unless `alone`: a process reading a whole model on
    its own (`moe eval`, or each rank of a replicated evaluation), which must not wait
    for the others.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    msd, osd, state = _state(model, opt, experts)
    state["extra"] = {"step": 0, "rng_cpu": torch.get_rng_state(), "run_id": "",
                      "recent_ce": "[]"}
    dcp.load(state, checkpoint_id=path, no_dist=alone or not _is_dist())
    # DCP wrote the tensors in place, so torch's own dicts hold the loaded values
    if opt is None:
        set_model_state_dict(model, msd)
    else:
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict={
            "state": osd["state"], "param_groups": state["optim"]["param_groups"]})
    return state["extra"]


def load_sharded_model(run: RunDir, model: nn.Module, step: int) -> None:
    """Weights only, into a plain single-process model (evaluation, export)."""
    load_sharded(run.sharded_checkpoint_path(step), model, None, {}, alone=True)

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

Verified like `.pt` checkpoints: before the rename, rank 0 writes `sha256.json` (a manifest
of every file's SHA-256) into the directory. A sharded checkpoint is loaded only when its
manifest exists and every file is present, listed and matches its digest; otherwise it is
skipped with a warning naming the file and the previous one is used (DCP itself checks no
data: a flipped byte in a shard loads as a wrong weight).

Single-process runs keep `moe.checkpoint`'s files; `newest_checkpoint` tells which
kind is newest.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe.io import atomic_write_json, read_json
from moe.rundir import RunDir

MANIFEST = "sha256.json"
"""Inside each step-N.dcp/: {"sha256": {relative file name: hex digest}} of every other file."""


@dataclass(frozen=True)
class ExpertLayout:
    """How one expert-parallel module's weights sit on the ranks."""

    mesh: Any
    """2-D DeviceMesh ("ep", "dp"): expert blocks over ep, FSDP shards over dp."""
    n_experts: int
    """Experts in the whole layer (E)."""


def newest_checkpoint(run: RunDir) -> tuple[str, int] | None:
    """("pt" | "dcp", step) of the newest checkpoint of either kind (of the sharded ones, the
    newest that verifies); None if none."""
    found = [("pt", s) for s, _ in run.list_checkpoints()[:1]]
    sharded = newest_verified_sharded(run)
    if sharded is not None:
        found.append(("dcp", sharded))
    return max(found, key=lambda kind_step: kind_step[1]) if found else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Record the SHA-256 of every file of a written checkpoint, atomically."""
    atomic_write_json(directory / MANIFEST,
                      {"sha256": {name: _sha256_file(directory / name)
                                  for name in _files(directory)}})


def verify_sharded(directory: Path) -> None:
    """ValueError naming the file when a sharded checkpoint is not exactly what its manifest
    lists: no manifest, a file missing, added, or whose SHA-256 differs."""
    try:
        manifest = read_json(directory / MANIFEST)
    except ValueError:
        manifest = None
    digests = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(digests, dict):
        raise ValueError(f"no readable {MANIFEST} in {directory} (unverifiable)")
    for name in sorted(set(_files(directory)) | set(digests)):
        path = directory / name
        if name not in digests:
            raise ValueError(f"{path} is not listed in {MANIFEST}")
        if not path.is_file():
            raise ValueError(f"{path} is missing")
        if _sha256_file(path) != digests[name]:
            raise ValueError(f"{path} does not match its SHA-256 in {MANIFEST} (damaged)")


def newest_verified_sharded(run: RunDir) -> int | None:
    """Step of the newest sharded checkpoint that verifies; each newer one is skipped with a
    warning naming the damaged file. Under a process group rank 0 checks, and every rank
    gets its answer (they must load the same one)."""
    step = None
    if not _is_dist() or dist.get_rank() == 0:
        for candidate, path in run.list_sharded_checkpoints():
            try:
                verify_sharded(path)
            except (ValueError, OSError) as exc:
                warnings.warn(f"sharded checkpoint {path.name} (step {candidate}) is unusable: "
                              f"{exc}; falling back to the previous one", stacklevel=2)
                continue
            step = candidate
            break
    if _is_dist():
        box = [step]
        dist.broadcast_object_list(box, src=0)
        step = box[0]
    return step


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


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
    with _single_process_ok():
        dcp.save(state, checkpoint_id=partial)
    if _is_dist():
        dist.barrier()
    if rank0:
        write_manifest(partial)  # before publication: a published one always has it
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
    with _single_process_ok():
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

"""Resuming a run from its newest checkpoint of either kind, on any layout.

A run trained on one process (or with DDP) writes `moe.checkpoint` files; one trained with
FSDP2 or expert parallelism writes sharded ones (`moe.checkpoint_dcp`). Either resumes on
any layout: a sharded checkpoint reshards through DCP's metadata, a single-file one is
loaded whole on every rank and handed to torch's `set_state_dict` (each rank keeps its
shard and, with expert parallelism, its experts).
"""

from __future__ import annotations

import json

import torch

from moe.checkpoint import check_fits, check_optimizer_fits, load_latest_checkpoint, run_ids_of
from moe.checkpoint_dcp import (
    ExpertLayout,
    load_sharded,
    newest_checkpoint,
    save_sharded,
)
from moe.config import RunConfig, config_hash
from moe.errors import BadInput
from moe.model import MoELM
from moe.rundir import RunDir
from moe.train.distributed import Dist
from moe.train.expert_parallel import expert_block
from moe.train.parallel import Parallel, unwrap
from moe.train.schedule import build_optimizer


def expert_layouts(par: Parallel) -> dict[str, ExpertLayout]:
    return {fqn: ExpertLayout(mesh=par.expert_mesh, n_experts=m.n_experts_global)
            for fqn, m in par.expert_modules.items()}


def save_sharded_step(run: RunDir, step: int, model, opt, cfg: RunConfig, par: Parallel,
                      recent_ce: list[float]) -> None:
    extra = {"step": step, "rng_cpu": torch.get_rng_state(), "run_id": config_hash(cfg),
             "recent_ce": json.dumps(list(recent_ce))}  # result.json's train_loss window
    save_sharded(run, step, model, opt, extra, expert_layouts(par),
                 keep=cfg.train.keep_checkpoints)


def load_newest(run: RunDir, model, opt, device, ddp: Dist, par: Parallel,
                cfg: RunConfig, ema=None) -> tuple[int, list[float]]:
    """Load the newest checkpoint into model/optimizer; returns its step and the window of
    recent train losses that result.json's train_loss averages ((0, []) if none).

    A single-file checkpoint is used only when it verifies, belongs to this run and fits the
    model and optimizer (`moe.checkpoint`); a sharded one only when its files match their
    manifest (`moe.checkpoint_dcp`); otherwise the previous one is tried.
    """
    newest = newest_checkpoint(run)
    if newest is not None and newest[0] == "dcp":
        path = run.sharded_checkpoint_path(newest[1])
        extra = load_sharded(path, unwrap(model), opt, expert_layouts(par))
        if extra.get("run_id") not in run_ids_of(cfg):
            raise BadInput(f"{path} was written by run {extra.get('run_id')!r}, not "
                             f"{config_hash(cfg)!r}: move it away or train into a new --out")
        torch.set_rng_state(extra["rng_cpu"])
        return int(extra["step"]), [float(x) for x in json.loads(extra.get("recent_ce", "[]"))]
    state = load_latest_checkpoint(run, map_location=device, run_ids=run_ids_of(cfg),
                                   accept=_fits(model, opt, cfg, par))
    if state is None:
        if ddp.is_main and (run.list_checkpoints() or run.list_sharded_checkpoints()):
            run.update_status(reason="no loadable checkpoint; restarted from step 0")
        return 0, []
    if par.distributed_state:
        _load_whole_into_shards(state, model, opt, cfg, par)
    else:
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    if ema is not None:  # the averaged weights (moe.train.averaging), when the run keeps them
        ema.load_state_dict(state.get("ema"))
    torch.set_rng_state(state["rng_cpu"])
    return int(state["step"]), [float(x) for x in state.get("recent_ce", [])]


def _fits(model, opt, cfg: RunConfig, par: Parallel):
    """The check a single-file state must pass: against the model and optimizer as they are,
    or, when they are sharded, against a whole model built without memory (meta device)."""
    def check(state: dict) -> None:
        if not par.distributed_state:
            check_fits(unwrap(model), state["model"])
            check_optimizer_fits(opt, state.get("optimizer"))
            return
        with torch.device("meta"):
            check_fits(MoELM(cfg.model), state["model"])

    return check


def _load_whole_into_shards(state: dict, model, opt, cfg: RunConfig, par: Parallel) -> None:
    """A single-file checkpoint into a sharded model: torch keeps each rank's part."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_state_dict,
    )

    whole = MoELM(cfg.model)
    whole.load_state_dict(state["model"])
    whole_opt = build_optimizer(whole, cfg.train)
    whole_opt.load_state_dict(state["optimizer"])
    osd = get_optimizer_state_dict(whole, whole_opt)
    msd = {k: _own_experts(k, v, par) for k, v in whole.state_dict().items()}
    osd = {"state": {fqn: {k: _own_experts(fqn, v, par) for k, v in s.items()}
                     for fqn, s in osd["state"].items()},
           "param_groups": osd["param_groups"]}
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))


def _own_experts(fqn: str, value, par: Parallel):
    """This rank's experts of an expert-parallel weight (everything else unchanged)."""
    for prefix, module in par.expert_modules.items():
        if fqn.startswith(prefix + ".") and isinstance(value, torch.Tensor) and value.ndim:
            return value[expert_block(module.n_experts_global, module.ep_size, module.ep_rank)]
    return value

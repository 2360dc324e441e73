"""Spreading one run over the processes of a job: DDP, FSDP2, expert parallelism, AC.

`parallelize(model, cfg, device, ddp)` applies the run's `[parallel]` section:

- `data = "ddp"`, `expert = 1`: `DistributedDataParallel` (every rank holds everything).
- `data = "fsdp"`: FSDP2 (`torch.distributed.fsdp.fully_shard`) per block and at the
  root over a 1-D `DeviceMesh` of all W ranks: weights, gradients and optimizer states
  are sharded. With bf16 precision (any device) the matmul weights are gathered in bf16
  and their gradients reduced in fp32; norms, router and residual stream stay fp32, the
  same dtypes as one process or DDP (`moe.model.precision`).
- `expert = P > 1` (needs fsdp): a 2-D mesh (ep = P, dp = W/P). Each expert layer keeps
  E/P experts (`moe.train.expert_parallel`) and is sharded by FSDP over its `dp` ranks
  only; everything else is sharded over all W. Every rank is a data-parallel rank (draws
  its own rows), so an expert's gradient sums the contributions of the P ranks of its
  group (they arrive by all-to-all) and FSDP averages over the W/P others, so
  `clip_grad_norm` first divides expert gradients by P to get the same mean over W
  as every other weight.
- `activation_checkpointing`: each block's activations are recomputed in the backward
  pass (`torch.distributed._composable.checkpoint`, which keeps parameter names).
- `train.compile` (default: on CUDA): each block's forward is `torch.compile`d in place.

The expert mesh is ordered (ep, dp), so the shard a rank holds of an expert weight is
DTensor's (Shard(0), Shard(0)) on it: the sharded checkpoints (`moe.train.dcp`) describe
expert weights by their global shape and reshard to any other layout.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moe.config import RunConfig
from moe.errors import BadConfig
from moe.train.distributed import Dist
from moe.train.expert_parallel import is_expert_parallel, make_expert_parallel


@dataclass
class Parallel:
    """The layout a model was parallelized with (what the loop and checkpoints need)."""

    world: int = 1
    data: str = "ddp"
    expert: int = 1
    world_mesh: object = None
    """1-D DeviceMesh ("dp",) of all ranks (FSDP only)."""
    expert_mesh: object = None
    """2-D DeviceMesh ("ep", "dp") (expert parallelism only)."""
    expert_modules: dict[str, nn.Module] = field(default_factory=dict)
    """FQN -> expert-parallel experts module."""

    @property
    def fsdp(self) -> bool:
        """The model is sharded with FSDP2 (a mesh exists: any world size under a group)."""
        return self.world_mesh is not None

    @property
    def distributed_state(self) -> bool:
        """Parameters are DTensors (checkpoints go through torch.distributed.checkpoint)."""
        return self.fsdp


def check_layout(cfg: RunConfig, world: int) -> None:
    """One-line errors for a [parallel] section this job cannot run."""
    p = cfg.parallel
    if p.expert > 1 and p.data != "fsdp":
        raise BadConfig(f"parallel.expert={p.expert} needs parallel.data=\"fsdp\" (the "
                         "non-expert weights are sharded with FSDP2)")
    if world == 1:
        return  # one process holds everything, whatever the layout it was planned for
    if world % p.expert:
        raise BadConfig(f"parallel.expert={p.expert} must divide the {world} processes of "
                         "the job")
    if p.expert > 1 and cfg.model.n_experts % p.expert:
        raise BadConfig(f"model.n_experts={cfg.model.n_experts} must be divisible by "
                         f"parallel.expert={p.expert}")


def shards_weights(cfg: RunConfig) -> bool:
    """Whether `parallelize` shards this run's weights in this process (FSDP2 under a group,
    even a group of one, e.g. torchrun with one process)."""
    return cfg.parallel.data == "fsdp" and dist.is_available() and dist.is_initialized()


def parallelize(model: nn.Module, cfg: RunConfig, device: torch.device, ddp: Dist,
                bf16: bool) -> tuple[nn.Module, Parallel]:
    """Apply the run's [parallel] section to a freshly built model (see the module doc)."""
    check_layout(cfg, ddp.world)
    pcfg = cfg.parallel
    par = Parallel(world=ddp.world, data=pcfg.data, expert=pcfg.expert)
    if pcfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in model.blocks:
            checkpoint(block)
    if compiles(cfg, device):
        compile_blocks(model)
    if ddp.world == 1 and not shards_weights(cfg):
        return model, par  # one process without a group: nothing to shard or reduce
    if pcfg.data == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), par
    if cfg.train.ema_decay or cfg.train.save_every:
        raise BadConfig("train.ema_decay and train.save_every keep whole copies of the weights "
                         "and do not work with sharded weights yet: use parallel.data=\"ddp\" "
                         "or set them to 0")
    _fully_shard(model, par, device, bf16)
    return model, par


COMPILE_BACKEND = "inductor"
"""torch.compile's backend for `train.compile` (tests choose a cheaper one)."""


def compiles(cfg: RunConfig, device: torch.device) -> bool:
    """`train.compile`, or (unset) whether the run is on CUDA."""
    return device.type == "cuda" if cfg.train.compile is None else cfg.train.compile


def compile_blocks(model: nn.Module) -> None:
    """torch.compile every block's forward in place, as torchtitan does: per block, so DDP's
    and FSDP2's hooks, activation checkpointing and parameter names stay as they are.

    Training, validation and task scoring run the compiled blocks; a KV-cached generation
    step (the block's `step` argument) runs eager: its cache is Python state that changes
    every call and would recompile each layer at each length. The forward is a method
    bound to its block, so a deep copy (the EMA weights) runs its own weights.
    """
    for block in model.blocks:
        block.forward = types.MethodType(_compiled_block_forward, block)


_COMPILED: dict[tuple[type, str], Callable] = {}


def _compiled_block_forward(self, x_BTD, cos_TF, sin_TF, mask_N, step=None):
    cls = type(self)
    if step is not None:
        return cls.forward(self, x_BTD, cos_TF, sin_TF, mask_N, step)
    key = (cls, COMPILE_BACKEND)
    if key not in _COMPILED:  # one compiled function for every block (the same code)
        _COMPILED[key] = torch.compile(cls.forward, backend=COMPILE_BACKEND)
    return _COMPILED[key](self, x_BTD, cos_TF, sin_TF, mask_N)


def _fully_shard(model: nn.Module, par: Parallel, device: torch.device, bf16: bool) -> None:
    """FSDP2 per block and at the root, under the run's precision policy
    (`moe.model.precision`): with bf16, the matmul weights (attention, experts, an untied
    LM head) are their own FSDP groups gathered in bf16 -- the values autocast would cast
    them to -- and reduced in fp32; norms, router, embedding and the residual stream stay
    fp32, and no group casts its inputs, exactly as on one process or under DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    keep, matmul = _mixed_precision(bf16)
    par.world_mesh = init_device_mesh(device.type, (par.world,), mesh_dim_names=("dp",))
    if par.expert > 1:
        par.expert_mesh = init_device_mesh(device.type, (par.expert, par.world // par.expert),
                                           mesh_dim_names=("ep", "dp"))
    for i, block in enumerate(model.blocks):
        if par.expert > 1 and block.ffn.router is not None:
            experts = make_expert_parallel(block.ffn.experts, par.expert_mesh["ep"].get_group())
            fully_shard(experts, mesh=par.expert_mesh["dp"], mp_policy=matmul)
            par.expert_modules[f"blocks.{i}.ffn.experts"] = experts
        elif bf16:
            fully_shard(block.ffn.experts, mesh=par.world_mesh, mp_policy=matmul)
        if bf16:
            fully_shard(block.attn, mesh=par.world_mesh, mp_policy=matmul)
        fully_shard(block, mesh=par.world_mesh, mp_policy=keep)
    if bf16 and model.head.weight is not model.embed.weight:
        fully_shard(model.head, mesh=par.world_mesh, mp_policy=matmul)
    fully_shard(model, mesh=par.world_mesh, mp_policy=keep)


def _mixed_precision(bf16: bool):
    """(policy of fp32 groups, policy of matmul-weight groups); neither casts inputs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    keep = MixedPrecisionPolicy(cast_forward_inputs=False)
    if not bf16:
        return keep, keep
    return keep, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)


def grad_sync(model: nn.Module, par: Parallel, sync: bool):
    """Context for one micro-batch's backward: reduce gradients only on the last one."""
    if par.world == 1:
        return contextlib.nullcontext()
    if par.fsdp:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def clip_grad_norm(model: nn.Module, par: Parallel, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (inf = only measure); returns the norm.

    Runs after the last backward of a step: it also completes the expert gradients' mean.
    """
    if not par.distributed_state:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    for module in par.expert_modules.values():
        for p in module.parameters():
            if p.grad is not None:
                p.grad.to_local().div_(par.expert)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total_sq = torch.zeros((), dtype=torch.float32, device=grads[0].to_local().device)
    for g in grads:  # every shard once: sum of squares over all ranks is the full norm^2
        total_sq += g.to_local().float().pow(2).sum() / _replicas(g)
    dist.all_reduce(total_sq)
    norm = math.sqrt(float(total_sq))
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.to_local().mul_(coef)
    return norm


def _replicas(g) -> int:
    """Ranks holding an identical copy of this DTensor's local shard."""
    n = 1
    for dim, placement in enumerate(g.placements):
        if placement.is_replicate():
            n *= g.device_mesh.size(dim)
    return n


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


__all__ = ["Parallel", "check_layout", "clip_grad_norm", "compile_blocks", "compiles",
           "grad_sync", "is_expert_parallel", "parallelize", "shards_weights", "unwrap"]

"""The step math of training: the loss, one optimizer step, the validation loss.

Everything here is a pure function of (model, optimizer, batch, config): no run directory,
no checkpoint, no logging (those are the run lifecycle's, `moe.train.loop`). `moe train`
and both training benchmarks (`moe bench train`, benchmarks/bench_train.py) run
`optimizer_step`, so a benchmark times the step users run.

Loss = CE + aux_loss_coef * load-balance + z_loss_coef * router z-loss (`training_loss`),
the load-balance term being the whole step's (all micro-batches, all ranks:
`moe.train.balance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.config import RunConfig, TrainConfig
from moe.data.shards import TokenData
from moe.errors import BadConfig, MissingResource
from moe.model import ModelOutput, precision
from moe.model.lm import IGNORE_INDEX
from moe.train.balance import all_ranks_sum, count_step_routing, routing_counts, step_balance_term
from moe.train.distributed import Dist
from moe.train.parallel import Parallel, clip_grad_norm, grad_sync


def pick_device(tcfg: TrainConfig) -> torch.device:
    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise MissingResource("train.device='cuda' but CUDA is not available; use train.device=cpu")
    if tcfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(tcfg.device)


def autocast_for(tcfg: TrainConfig, device: torch.device):
    """The run's precision policy (`moe.model.precision`) as a context for its forwards."""
    return precision.autocast(tcfg.precision, device)


@dataclass
class StepStats:
    loss: float
    ce: float
    lb: float
    z: float
    grad_norm: float
    routing: tuple
    """RoutingStats per MoE layer of the last micro-batch (read only when logging)."""

    @property
    def load(self) -> list[float]:
        return [s.max_over_mean_load for s in self.routing]


def grad_accum_steps(cfg: RunConfig, world: int) -> int:
    """Micro-batches per step: train.grad_accum, or what parallel.micro_batch implies."""
    micro = cfg.parallel.micro_batch
    if not micro:
        return cfg.train.grad_accum
    if cfg.train.batch_size % (micro * world):
        raise BadConfig(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                         f"parallel.micro_batch={micro} x {world} ranks")
    return cfg.train.batch_size // (micro * world)


def micro_rows(cfg: RunConfig, ddp: Dist, micro: int) -> slice:
    """This rank's rows of the step's global batch in micro-batch `micro`.

    The global batch is a pure function of (seed, step); micro-batch m on rank r takes
    rows [m * B/A + r * B/(A W), ...) of it, so any (A, W) split covers the same rows.
    """
    micro_bs = cfg.train.batch_size // grad_accum_steps(cfg, ddp.world)
    per_rank = micro_bs // ddp.world
    start = micro * micro_bs + ddp.rank * per_rank
    return slice(start, start + per_rank)


def training_loss(out: ModelOutput, lb: torch.Tensor, tcfg: TrainConfig) -> torch.Tensor:
    """The objective every training step minimises: CE + aux x load-balance + z x z-loss.

    `lb` is this micro-batch's share of the step's load-balance loss (`step_balance_term`).
    """
    return out.ce_loss + tcfg.aux_loss_coef * lb + tcfg.z_loss_coef * out.z_loss


def train_step(model, opt, data: TokenData, cfg: RunConfig, step: int, lr: float,
               device: torch.device, ddp: Dist, par: Parallel | None = None) -> StepStats:
    """One optimizer step over grad_accum micro-batches of this rank's share of the batch
    `step` of the training data."""
    tcfg = cfg.train

    def micro_batch(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return data.train.batch(tcfg.seed, step, tcfg.batch_size, micro_rows(cfg, ddp, micro))

    return optimizer_step(model, opt, micro_batch, grad_accum_steps(cfg, ddp.world), cfg,
                          device, ddp, par, lr=lr)


def optimizer_step(model, opt, micro_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                   n_micro: int, cfg: RunConfig, device: torch.device, ddp: Dist | None = None,
                   par: Parallel | None = None, *, lr: float | None = None) -> StepStats:
    """One optimizer step over the micro-batches `micro_batch(0 .. n_micro-1)` of this rank.

    The load-balance loss is the step's (all micro-batches, all ranks: `moe.train.balance`);
    gradients are clipped to train.grad_clip and a non-finite step is not applied. `lr`
    None keeps the optimizer's learning rate (the benchmarks' fixed-rate steps).
    """
    tcfg = cfg.train
    ddp = ddp or Dist()
    par = par or Parallel(world=ddp.world)
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr

    def on_device(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = micro_batch(micro)
        return x.to(device), y.to(device)

    def forward(x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        with autocast_for(tcfg, device):
            return model(x, y)

    counts = None
    if n_micro > 1 and tcfg.aux_loss_coef > 0 and not cfg.model.is_dense:
        counts = count_step_routing(model, map(on_device, range(n_micro)), ddp.world, forward)
    totals = torch.zeros(4, device=device)  # loss, ce, lb, z
    routing: tuple = ()
    for micro in range(n_micro):
        x, y = on_device(micro)
        with grad_sync(model, par, micro == n_micro - 1):
            out: ModelOutput = forward(x, y)
            step_counts = counts if counts is not None else all_ranks_sum(
                routing_counts(out), ddp.world)
            lb = step_balance_term(out, step_counts, cfg.model.top_k, n_micro * ddp.world)
            loss = training_loss(out, lb, tcfg)
            (loss / n_micro).backward()
        parts = torch.stack([loss.detach(), out.ce_loss.detach(), lb.detach(),
                             out.z_loss.detach()]).float()
        totals += parts / n_micro
        routing = out.routing
    grad_norm = clip_grad_norm(model, par, tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf"))
    totals = ddp.mean(totals)
    loss_v, ce_v, lb_v, z_v = totals.tolist()
    if math.isfinite(loss_v) and math.isfinite(float(grad_norm)):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepStats(loss=loss_v, ce=ce_v, lb=lb_v, z=z_v, grad_norm=float(grad_norm),
                     routing=routing)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, data: TokenData, cfg: RunConfig,
                    device: torch.device, ddp: Dist | None = None) -> float:
    """Mean CE (nats/token) over data.val_batches fixed batches of the held-out split.

    Every rank evaluates its rows of each batch, a micro-batch of rows at a time (so
    full-vocabulary logits exist for one micro-batch only), and the sums are reduced.
    """
    ddp = ddp or Dist()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # CE x tokens, tokens
    n_micro = grad_accum_steps(cfg, ddp.world)
    for i in range(cfg.data.val_batches):
        for micro in range(n_micro):
            rows = micro_rows(cfg, ddp, micro)
            x, y = data.val.batch(cfg.train.seed + 1_000_003, i, cfg.train.batch_size, rows)
            x, y = x.to(device), y.to(device)
            with autocast_for(cfg.train, device):
                ce = model(x, y).ce_loss
            n_tokens = (y != IGNORE_INDEX).sum()
            sums += torch.stack([ce.double() * n_tokens, n_tokens.double()])
    if ddp.world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    return float(sums[0] / sums[1])


def validation_batches(data: TokenData, cfg: RunConfig):
    """The fixed held-out (inputs, targets) batches every validation loss is measured on."""
    for i in range(cfg.data.val_batches):
        yield data.val.batch(cfg.train.seed + 1_000_003, i, cfg.train.batch_size)

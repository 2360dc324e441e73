"""The training job of one run: budget, schedule, loop, checkpoints, resume, result.

`train_run(cfg, run_dir)` is what `moe train` and every sweep job call. It is
safe to call again on the same directory: it resumes from the newest valid
checkpoint, and a finished run (result.json present) returns its result at
once. On CPU a resumed run ends bit-identical to an uninterrupted one, because
everything a step depends on is in the checkpoint or is a pure function of the
step (data sampling, learning rate).

Token budget: `train.tokens`, or `train.tpp` x *total* parameters (the paper's
convention: sparse models get more tokens than dense ones of equal active size).
Optimizer steps = ceil(tokens / (batch_size * seq_len)).

Loss = CE + aux_loss_coef * load-balance + z_loss_coef * router z-loss.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe.checkpoint import load_latest_checkpoint, save_checkpoint
from moe.config import RunConfig, TrainConfig, config_hash
from moe.data.shards import TokenData, load_data
from moe.eval import evaluate_tasks, flat_results, load_tasks
from moe.model import ModelOutput, MoELM
from moe.params import count_params, resolve_tokens, train_flops_per_token
from moe.rundir import RunDir
from moe.train.averaging import WeightEMA, save_snapshot
from moe.train.distributed import Dist
from moe.train.schedule import build_optimizer, lr_at, total_steps


class TrainingFailed(RuntimeError):
    """The run diverged (NaN/inf loss); status.json says where and why."""


def pick_device(tcfg: TrainConfig) -> torch.device:
    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but CUDA is not available; use train.device=cpu")
    if tcfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(tcfg.device)


def autocast_for(tcfg: TrainConfig, device: torch.device):
    use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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


def train_step(model, opt, data: TokenData, cfg: RunConfig, step: int, lr: float,
               device: torch.device, ddp: Dist) -> StepStats:
    """One optimizer step over grad_accum micro-batches of this rank's share of the batch."""
    tcfg = cfg.train
    for group in opt.param_groups:
        group["lr"] = lr
    micro_bs = tcfg.batch_size // tcfg.grad_accum
    per_rank = micro_bs // ddp.world
    totals = torch.zeros(4, device=device)  # loss, ce, lb, z
    routing: tuple = ()
    for micro in range(tcfg.grad_accum):
        x, y = data.train.batch(tcfg.seed, step * tcfg.grad_accum + micro, micro_bs)
        rows = slice(ddp.rank * per_rank, (ddp.rank + 1) * per_rank)
        x, y = x[rows].to(device), y[rows].to(device)
        sync = micro == tcfg.grad_accum - 1 or ddp.world == 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast_for(tcfg, device):
                out: ModelOutput = model(x, y)
            loss = out.ce_loss + tcfg.aux_loss_coef * out.lb_loss + tcfg.z_loss_coef * out.z_loss
            (loss / tcfg.grad_accum).backward()
        parts = torch.stack([loss.detach(), out.ce_loss.detach(), out.lb_loss.detach(),
                             out.z_loss.detach()]).float()
        totals += parts / tcfg.grad_accum
        routing = out.routing
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf"))
    totals = ddp.mean(totals)
    loss_v, ce_v, lb_v, z_v = totals.tolist()
    if math.isfinite(loss_v) and math.isfinite(float(grad_norm)):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return StepStats(loss=loss_v, ce=ce_v, lb=lb_v, z=z_v, grad_norm=float(grad_norm),
                     routing=routing)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, data: TokenData, cfg: RunConfig,
                    device: torch.device) -> float:
    """Mean CE (nats/token) over data.val_batches fixed batches of the held-out split."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in validation_batches(data, cfg):
        with autocast_for(cfg.train, device):
            losses.append(float(model(x.to(device), y.to(device)).ce_loss))
    model.train(was_training)
    return sum(losses) / len(losses)


def validation_batches(data: TokenData, cfg: RunConfig):
    """The fixed held-out (inputs, targets) batches every validation loss is measured on."""
    for i in range(cfg.data.val_batches):
        yield data.val.batch(cfg.train.seed + 1_000_003, i, cfg.train.batch_size)


def prepare_run_dir(cfg: RunConfig, run: RunDir) -> None:
    """Write config.toml, or check that an existing one describes the same run.

    The same run (equal run id) with other evaluation or logging settings takes the new
    config: those settings do not change the trained weights (`moe.config.run_id`).
    """
    if run.has_config():
        existing = run.read_config()
        if config_hash(existing) != config_hash(cfg):
            raise ValueError(f"{run.path} already holds a different run (its config.toml "
                             "differs); use a new --out directory or the same config")
        if existing == cfg:
            return
    run.write_config(cfg)


def _progress_bar(n_steps: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n_steps, initial=start, unit="step", dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def _metrics_row(step: int, n_steps: int, cfg: RunConfig, s: StepStats, lr: float,
                 tokens_per_s: float) -> dict[str, Any]:
    return {"step": step, "tokens": step * cfg.train.batch_size * cfg.model.seq_len,
            "loss": s.loss, "ce": s.ce, "lb": s.lb, "z": s.z, "lr": lr,
            "grad_norm": s.grad_norm, "tokens_per_s": tokens_per_s,
            "max_over_mean_load": s.load, "steps_total": n_steps, "time": time.time()}


def _fail(run: RunDir, ddp: Dist, step: int, reason: str) -> TrainingFailed:
    if ddp.is_main:
        run.update_status(state="failed", step=step, reason=reason)
    return TrainingFailed(f"run {run.path} failed at step {step}: {reason}")


def _resume(run: RunDir, model, opt, device, ddp: Dist, ema: WeightEMA) -> int:
    """Load the newest valid checkpoint into model/optimizer; returns its step (0 if none)."""
    state = load_latest_checkpoint(run, map_location=device)
    if state is None:
        if ddp.is_main and run.list_checkpoints():
            run.update_status(reason="no loadable checkpoint; restarted from step 0")
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    ema.load_state_dict(state.get("ema"))
    torch.set_rng_state(state["rng_cpu"])
    return int(state["step"])


def _checkpoint(run: RunDir, step: int, model, opt, cfg: RunConfig, ddp: Dist,
                ema: WeightEMA) -> None:
    if ddp.is_main:
        state = {"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                 "step": step, "rng_cpu": torch.get_rng_state(), "run_id": config_hash(cfg)}
        if ema.state_dict() is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(run, step, state, keep=cfg.train.keep_checkpoints)
    if ddp.world > 1:
        dist.barrier()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _setup(cfg: RunConfig, device: torch.device, ddp: Dist):
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    per_micro = cfg.train.batch_size // cfg.train.grad_accum
    if per_micro % ddp.world:
        raise ValueError(f"train.batch_size / train.grad_accum = {per_micro} sequences must be "
                         f"divisible by the {ddp.world} data-parallel ranks")
    torch.manual_seed(cfg.train.seed)
    model = MoELM(cfg.model).to(device)
    opt = build_optimizer(model, cfg.train)
    return model, opt


def train_run(cfg: RunConfig, run_dir: str | os.PathLike, *, progress: bool = False
              ) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) the run in `run_dir`.

    A finished run whose result lacks some of `cfg.eval.tasks` is evaluated on those
    tasks only (nothing is trained) and its result.json gains their columns.
    """
    run = RunDir(run_dir)
    ddp = Dist.current()
    data = load_data(cfg.data, cfg.model.seq_len)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                         f"tokenizer's {data.tokenizer.vocab_size} ids")
    if cfg.eval.tasks:  # a missing task file or a typo fails now, not after training
        load_tasks(cfg)
    device = pick_device(cfg.train)
    if ddp.is_main:
        prepare_run_dir(cfg, run)
    if run.is_done():
        return _evaluate_missing(run, cfg, data, device, ddp)
    model, opt = _setup(cfg, device, ddp)
    ema = WeightEMA(cfg.train.ema_decay, cfg.train.ema_start)
    start = _resume(run, model, opt, device, ddp, ema)
    n_steps, tokens_total = total_steps(cfg), resolve_tokens(cfg)
    if ddp.is_main:
        run.truncate_metrics(start)
        run.update_status(state="running", step=start, steps_total=n_steps,
                          tokens_total=tokens_total, reason=None)
    if ddp.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    model.train()
    t0 = t_last = time.time()
    last_step = start
    recent_ce: list[float] = []
    bar = _progress_bar(n_steps, start, progress and ddp.is_main)
    for step in range(start, n_steps):
        lr = lr_at(step, cfg.train, n_steps)
        stats = train_step(model, opt, data, cfg, step, lr, device, ddp)
        if not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
            raise _fail(run, ddp, step + 1, f"diverged: non-finite loss or gradient at step "
                        f"{step + 1} (loss {stats.loss:.4g}, grad norm {stats.grad_norm:.4g}, "
                        f"lr {lr:.3g})")
        recent_ce = (recent_ce + [stats.ce])[-20:]
        done = step + 1
        ema.update(_unwrap(model), done)
        if ddp.is_main and cfg.train.save_every and (done % cfg.train.save_every == 0
                                                     or done == n_steps):
            save_snapshot(run, done, _unwrap(model))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", refresh=False)
        if ddp.is_main and (done % cfg.train.log_every == 0 or done == n_steps or done == 1):
            now = time.time()
            tps = (done - last_step) * cfg.train.batch_size * cfg.model.seq_len / (now - t_last)
            t_last, last_step = now, done
            run.append_metrics(_metrics_row(done, n_steps, cfg, stats, lr, tps))
            run.update_status(step=done, tokens_done=min(tokens_total, done *
                              cfg.train.batch_size * cfg.model.seq_len), last_loss=stats.loss)
        if cfg.eval.every and cfg.eval.tasks and done % cfg.eval.every == 0 and done < n_steps:
            _periodic_eval(model, data, cfg, device, run, done, ddp)
        if done % cfg.train.checkpoint_every == 0 or done == n_steps:
            _checkpoint(run, done, model, opt, cfg, ddp, ema)
    if bar is not None:
        bar.close()
    return _finish(run, cfg, _unwrap(model), data, device, ddp, recent_ce,
                   n_steps - start, time.time() - t0, ema)


def _run_tasks(model, data: TokenData, cfg: RunConfig, device: torch.device,
               tasks: list[str] | None = None) -> dict:
    names = list(cfg.eval.tasks) if tasks is None else tasks
    return evaluate_tasks(model, data.tokenizer, cfg, names, device=device)


def _periodic_eval(model, data, cfg, device, run: RunDir, step: int, ddp: Dist) -> None:
    if ddp.is_main:
        run.append_metrics({"step": step, "eval": _run_tasks(_unwrap(model), data, cfg, device)})
    if ddp.world > 1:
        dist.barrier()


def _evaluate_missing(run: RunDir, cfg: RunConfig, data: TokenData, device: torch.device,
                      ddp: Dist) -> dict[str, Any]:
    """A finished run: evaluate the tasks its result lacks, train nothing."""
    result = run.read_result() or {}
    missing = [t for t in cfg.eval.tasks if f"task/{t}/loss" not in result]
    if missing and ddp.is_main:
        from moe.checkpoint import load_run_model

        run.update_status(state="running", reason=f"evaluating {', '.join(missing)}")
        model, _, step = load_run_model(run.path, device=device)
        tasks = _run_tasks(model, data, cfg, device, missing)
        run.merge_eval(tasks, flat_results(tasks), step=step)
        run.update_status(state="done", reason=None)
        result = run.read_result() or {}
    if ddp.world > 1:
        dist.barrier()
    return result


def _finish_ema(run: RunDir, cfg: RunConfig, model, data: TokenData, device, ema: WeightEMA,
                result: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the EMA weights and write them as RUN_DIR/ema/; returns the EMA columns."""
    import copy

    from moe.train.averaging import write_weights_run

    averaged = copy.deepcopy(model)
    averaged.load_state_dict(ema.state_dict())
    val_ema = validation_loss(averaged, data, cfg, device)
    write_weights_run(run.ema_run(), cfg, total_steps(cfg), ema.state_dict(),
                      {**result, "val_loss": val_ema, "val_loss_raw": result["val_loss"],
                       "recipe": "ema"})
    return {"val_loss_ema": val_ema}


def build_result(cfg: RunConfig, **metrics: Any) -> dict[str, Any]:
    """The flat result record: headline columns, every config key, counts, metrics."""
    counts = count_params(cfg.model)
    tokens = resolve_tokens(cfg)
    record: dict[str, Any] = {
        "run_id": config_hash(cfg), "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers, "n_experts": cfg.model.n_experts,
        "top_k": cfg.model.top_k, "sparsity": cfg.model.sparsity,
        "n_params_total": counts.total, "n_params_active": counts.active,
        "n_params_embedding": counts.embedding, "tokens": tokens,
        "tpp": tokens / counts.total,
        "flops": train_flops_per_token(cfg.model) * tokens,
    }
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            record[f"{section}.{key}"] = ",".join(value) if isinstance(value, list) else value
    record.update(metrics)
    return record


def _finish(run: RunDir, cfg: RunConfig, model, data: TokenData, device, ddp: Dist,
            recent_ce: list[float], steps_run: int, train_s: float, ema: WeightEMA) -> dict:
    result: dict[str, Any] = {}
    if ddp.is_main:
        val = validation_loss(model, data, cfg, device)
        rows = [r for r in run.read_metrics() if "ce" in r]
        train_loss = (sum(recent_ce) / len(recent_ce)) if recent_ce else (
            rows[-1]["ce"] if rows else float("nan"))
        tps = steps_run * cfg.train.batch_size * cfg.model.seq_len / train_s if steps_run else None
        result = build_result(cfg, train_loss=train_loss, val_loss=val, steps=total_steps(cfg),
                              epochs=resolve_tokens(cfg) / data.train.n_tokens,
                              tokens_per_s=tps, train_wall_s=train_s,
                              device=str(device), world_size=ddp.world)
        if ema.state_dict() is not None:
            result.update(_finish_ema(run, cfg, model, data, device, ema, result))
        if cfg.eval.tasks:
            run.update_status(state="running", reason="evaluating tasks")
            tasks = _run_tasks(model, data, cfg, device)
            run.merge_eval(tasks, flat_results(tasks))  # result.json does not exist yet
            result.update(flat_results(tasks))
        run.write_result(result)
        run.update_status(state="done", reason=None, step=total_steps(cfg),
                          tokens_done=resolve_tokens(cfg))
    if ddp.world > 1:
        dist.barrier()
    return result

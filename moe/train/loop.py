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

from moe.checkpoint import run_ids_of, save_checkpoint
from moe.config import RunConfig, TrainConfig, config_hash
from moe.data.shards import TokenData, load_data
from moe.eval import EvalShard, evaluate_tasks, flat_results, load_tasks
from moe.model import ModelOutput, MoELM
from moe.model.lm import IGNORE_INDEX
from moe.params import count_params, resolve_tokens, train_flops_per_token
from moe.rundir import RunDir
from moe.train.averaging import WeightEMA, save_snapshot
from moe.train.balance import all_ranks_sum, count_step_routing, routing_counts, step_balance_term
from moe.train.distributed import Dist
from moe.train.parallel import Parallel, clip_grad_norm, grad_sync, parallelize, shards_weights
from moe.train.preempt import active_watch
from moe.train.resources import apply_num_threads, check_resources
from moe.train.resume import load_newest, save_sharded_step
from moe.train.schedule import build_optimizer, lr_at, total_steps
from moe.train.tracking import Tracker, open_tracker


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


def grad_accum_steps(cfg: RunConfig, world: int) -> int:
    """Micro-batches per step: train.grad_accum, or what parallel.micro_batch implies."""
    micro = cfg.parallel.micro_batch
    if not micro:
        return cfg.train.grad_accum
    if cfg.train.batch_size % (micro * world):
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                         f"parallel.micro_batch={micro} x {world} ranks")
    return cfg.train.batch_size // (micro * world)


def _micro_rows(cfg: RunConfig, ddp: Dist, micro: int) -> slice:
    """This rank's rows of the step's global batch in micro-batch `micro`.

    The global batch is a pure function of (seed, step); micro-batch m on rank r takes
    rows [m * B/A + r * B/(A W), ...) of it, so any (A, W) split covers the same rows.
    """
    micro_bs = cfg.train.batch_size // grad_accum_steps(cfg, ddp.world)
    per_rank = micro_bs // ddp.world
    start = micro * micro_bs + ddp.rank * per_rank
    return slice(start, start + per_rank)


def train_step(model, opt, data: TokenData, cfg: RunConfig, step: int, lr: float,
               device: torch.device, ddp: Dist, par: Parallel | None = None) -> StepStats:
    """One optimizer step over grad_accum micro-batches of this rank's share of the batch.

    The load-balance loss is the step's (all micro-batches, all ranks: `moe.train.balance`).
    """
    tcfg = cfg.train
    n_micro = grad_accum_steps(cfg, ddp.world)
    par = par or Parallel(world=ddp.world)
    for group in opt.param_groups:
        group["lr"] = lr

    def micro_batch(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.train.batch(tcfg.seed, step, tcfg.batch_size, _micro_rows(cfg, ddp, micro))
        return x.to(device), y.to(device)

    def forward(x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        with autocast_for(tcfg, device):
            return model(x, y)

    counts = None
    if n_micro > 1 and tcfg.aux_loss_coef > 0 and not cfg.model.is_dense:
        counts = count_step_routing(model, map(micro_batch, range(n_micro)), ddp.world,
                                    forward)
    totals = torch.zeros(4, device=device)  # loss, ce, lb, z
    routing: tuple = ()
    for micro in range(n_micro):
        x, y = micro_batch(micro)
        with grad_sync(model, par, micro == n_micro - 1):
            out: ModelOutput = forward(x, y)
            step_counts = counts if counts is not None else all_ranks_sum(
                routing_counts(out), ddp.world)
            lb = step_balance_term(out, step_counts, cfg.model.top_k,
                                   n_micro * ddp.world)
            loss = out.ce_loss + tcfg.aux_loss_coef * lb + tcfg.z_loss_coef * out.z_loss
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
            rows = _micro_rows(cfg, ddp, micro)
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


def prepare_run_dir(cfg: RunConfig, run: RunDir) -> None:
    """Write config.toml, or check that an existing one describes the same run.

    The same run (equal run id) with other evaluation or logging settings takes the new
    config: those settings do not change the trained weights (`moe.config.run_id`).
    A different run is refused once anything was trained (a checkpoint, a metric or a
    result); a directory whose config never trained (it failed at once) takes the new one.
    """
    if run.has_config():
        existing = run.read_config()
        if config_hash(existing) != config_hash(cfg):
            if run.is_done() or run.list_checkpoints() or run.read_metrics():
                what = "finished" if run.is_done() else "partly trained"
                raise ValueError(f"{run.path} already holds a different run ({what}; its "
                                 "config.toml differs); use a new --out directory or the "
                                 "same config")
            run.update_status(state="pending", reason="config replaced before any training",
                              step=0)
        elif existing == cfg:
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


def _resume(run: RunDir, model, opt, device, ddp: Dist, par: Parallel, cfg: RunConfig,
            ema: WeightEMA) -> tuple[int, list[float]]:
    """Load the newest valid checkpoint of this run that fits model and optimizer (and the
    EMA weights it holds); returns its step and the window of recent train losses."""
    return load_newest(run, model, opt, device, ddp, par, cfg, ema)


def _checkpoint(run: RunDir, step: int, model, opt, cfg: RunConfig, ddp: Dist,
                par: Parallel, recent_ce: list[float], ema: WeightEMA) -> None:
    if par.distributed_state:
        save_sharded_step(run, step, model, opt, cfg, par, recent_ce)
        return
    if ddp.is_main:
        state = {"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                 "step": step, "rng_cpu": torch.get_rng_state(), "run_id": config_hash(cfg),
                 "recent_ce": list(recent_ce)}  # result.json's train_loss window survives resume
        if ema.state_dict() is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(run, step, state, keep=cfg.train.keep_checkpoints)
    if ddp.world > 1:
        dist.barrier()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _setup(cfg: RunConfig, device: torch.device, ddp: Dist):
    """The model laid out by [parallel], and its optimizer (built on the sharded weights)."""
    apply_num_threads(cfg, device, ddp.world)
    per_micro = cfg.train.batch_size // grad_accum_steps(cfg, ddp.world)
    if per_micro % ddp.world:
        raise ValueError(f"train.batch_size / train.grad_accum = {per_micro} sequences must be "
                         f"divisible by the {ddp.world} data-parallel ranks")
    torch.manual_seed(cfg.train.seed)
    model = MoELM(cfg.model).to(device)
    bf16 = not isinstance(autocast_for(cfg.train, device), contextlib.nullcontext)
    model, par = parallelize(model, cfg, device, ddp, bf16)
    opt = build_optimizer(model, cfg.train)
    return model, opt, par


def train_run(cfg: RunConfig, run_dir: str | os.PathLike, *, progress: bool = False
              ) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) the run in `run_dir`.

    A finished run whose result lacks some of `cfg.eval.tasks` is evaluated on those
    tasks only (nothing is trained) and its result.json gains their columns.

    Before anything is allocated or written the run's memory is estimated and refused
    when the machine (or GPU) cannot hold it. One process at a time trains a directory
    (`RunDir.writer_lock`, held until this returns); a failure once the directory holds
    this run marks it failed with the reason.
    """
    run = RunDir(run_dir)
    ddp = Dist.current()
    if not run.is_done():  # a finished run only evaluates
        check_resources(cfg, pick_device(cfg.train), ddp.world)
    data = _load_inputs(cfg)  # a missing task file or a typo fails now, before any write
    with run.writer_lock() if ddp.is_main else contextlib.nullcontext():
        if ddp.is_main:
            run.clean_stale_tmp()
        try:
            return _train_run(cfg, run, ddp, data, progress)
        except TrainingFailed:
            raise  # status.json already says where and why
        except (Exception, KeyboardInterrupt) as exc:
            if ddp.is_main:
                _mark_failed(run, cfg, exc)
            raise


def _mark_failed(run: RunDir, cfg: RunConfig, exc: BaseException) -> None:
    """Record a failure in status.json when the directory holds this unfinished run."""
    try:
        if run.is_done() or not run.has_config() or \
                config_hash(run.read_config()) != config_hash(cfg):
            return
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
            f"{type(exc).__name__}: {exc}"
        run.update_status(state="failed", reason=reason[:500])
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _load_inputs(cfg: RunConfig) -> TokenData:
    data = load_data(cfg.data, cfg.model.seq_len)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                         f"tokenizer's {data.tokenizer.vocab_size} ids")
    if cfg.eval.tasks:
        load_tasks(cfg)
    return data


def _train_run(cfg: RunConfig, run: RunDir, ddp: Dist, data: TokenData, progress: bool
               ) -> dict[str, Any]:
    device = pick_device(cfg.train)
    if ddp.is_main:
        prepare_run_dir(cfg, run)
    if run.is_done():
        return _evaluate_missing(run, cfg, data, device, ddp)
    tracker = open_tracker(cfg, run) if ddp.is_main else Tracker()
    model, opt, par = _setup(cfg, device, ddp)
    ema = WeightEMA(cfg.train.ema_decay, cfg.train.ema_start)
    start, recent_ce = _resume(run, model, opt, device, ddp, par, cfg, ema)
    n_steps, tokens_total = total_steps(cfg), resolve_tokens(cfg)
    if ddp.is_main:
        run.truncate_metrics(start)
        run.update_status(state="running", step=start, steps_total=n_steps,
                          tokens_total=tokens_total, reason=None)
    model.train()
    t0 = t_last = time.time()
    last_step = start
    bar = _progress_bar(n_steps, start, progress and ddp.is_main)
    watch = active_watch()  # under submitit: a stop warning checkpoints at the step's end
    if watch is not None:
        watch.in_loop = True
    for step in range(start, n_steps):
        lr = lr_at(step, cfg.train, n_steps)
        stats = train_step(model, opt, data, cfg, step, lr, device, ddp, par)
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
            row = _metrics_row(done, n_steps, cfg, stats, lr, tps)
            run.append_metrics(row)
            tracker.log(row)
            run.update_status(step=done, tokens_done=min(tokens_total, done *
                              cfg.train.batch_size * cfg.model.seq_len), last_loss=stats.loss)
        if cfg.eval.every and cfg.eval.tasks and done % cfg.eval.every == 0 and done < n_steps:
            _periodic_eval(model, data, cfg, device, run, done, ddp, par, tracker)
        stop = watch is not None and watch.poll(ddp.world, device)
        if done % cfg.train.checkpoint_every == 0 or done == n_steps or stop:
            _checkpoint(run, done, model, opt, cfg, ddp, par, recent_ce, ema)
        if stop:
            watch.hand_over(ddp.rank)
    if watch is not None:
        watch.in_loop = False
    if bar is not None:
        bar.close()
    tracker.close()
    return _finish(run, cfg, model, data, device, ddp, recent_ce,
                   n_steps - start, time.time() - t0, par, ema)


def _run_tasks(model, data: TokenData, cfg: RunConfig, device: torch.device, ddp: Dist,
               par: Parallel, tasks: list[str] | None = None) -> dict:
    """Every rank evaluates its share of the tasks' items (`moe.eval.shard`): a sharded model
    as it is, in lockstep; a replicated one on each rank's own copy. All return the metrics."""
    names = list(cfg.eval.tasks) if tasks is None else tasks
    shard = EvalShard(ddp.rank, ddp.world, lockstep=par.distributed_state)
    evaluated = model if par.distributed_state else _unwrap(model)
    return evaluate_tasks(evaluated, data.tokenizer, cfg, names, device=device, shard=shard)


def _periodic_eval(model, data, cfg, device, run: RunDir, step: int, ddp: Dist,
                   par: Parallel, tracker: Tracker) -> None:
    tasks = _run_tasks(model, data, cfg, device, ddp, par)
    if ddp.is_main:
        row = {"step": step, "eval": tasks}
        run.append_metrics(row)
        tracker.log(row)


def _evaluate_missing(run: RunDir, cfg: RunConfig, data: TokenData, device: torch.device,
                      ddp: Dist) -> dict[str, Any]:
    """A finished run: evaluate the tasks its result lacks, train nothing.

    Every rank takes part: with sharded weights (`parallel.data = "fsdp"` under a process
    group) the model is laid out as in training and its newest checkpoint loaded into the
    shards; otherwise every rank loads the whole model.
    """
    result = run.read_result() or {}
    if result.get("run_id", config_hash(cfg)) not in run_ids_of(cfg):
        raise ValueError(f"{run.path} holds the finished run {result.get('run_id')!r}, not "
                         f"{config_hash(cfg)!r}; use a new --out directory or its config")
    missing = [t for t in cfg.eval.tasks if f"task/{t}/loss" not in result]
    if missing:
        if ddp.is_main:
            run.update_status(state="running", reason=f"evaluating {', '.join(missing)}")
        if shards_weights(cfg):
            model, opt, par = _setup(cfg, device, ddp)
            step, _ = load_newest(run, model, opt, device, ddp, par, cfg)
            del opt
        else:
            from moe.checkpoint import load_run_model

            model, _, step = load_run_model(run.path, device=device)
            par = Parallel(world=ddp.world)
        tasks = _run_tasks(model, data, cfg, device, ddp, par, missing)
        if ddp.is_main:
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
            recent_ce: list[float], steps_run: int, train_s: float, par: Parallel,
            ema: WeightEMA) -> dict:
    result: dict[str, Any] = {}
    val = validation_loss(model, data, cfg, device, ddp)  # every rank its share
    tasks: dict[str, Any] = {}
    if cfg.eval.tasks:  # every rank its share of the items
        if ddp.is_main:
            run.update_status(state="running", reason="evaluating tasks")
        tasks = _run_tasks(model, data, cfg, device, ddp, par)
    if ddp.is_main:
        rows = [r for r in run.read_metrics() if "ce" in r]
        train_loss = (sum(recent_ce) / len(recent_ce)) if recent_ce else (
            rows[-1]["ce"] if rows else float("nan"))
        tps = steps_run * cfg.train.batch_size * cfg.model.seq_len / train_s if steps_run else None
        result = build_result(cfg, train_loss=train_loss, val_loss=val, steps=total_steps(cfg),
                              epochs=resolve_tokens(cfg) / data.train.n_tokens,
                              tokens_per_s=tps, train_wall_s=train_s,
                              device=str(device), world_size=ddp.world)
        if ema.state_dict() is not None:
            result.update(_finish_ema(run, cfg, _unwrap(model), data, device, ema, result))
        if tasks:
            run.merge_eval(tasks, flat_results(tasks))  # result.json does not exist yet
            result.update(flat_results(tasks))
        run.write_result(result)
        run.update_status(state="done", reason=None, step=total_steps(cfg),
                          tokens_done=resolve_tokens(cfg))
    if ddp.world > 1:
        dist.barrier()
    return result

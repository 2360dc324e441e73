"""The run lifecycle: the training job of one run directory, from its config to its record.

The step math is `moe.train.step` (the loss, one optimizer step, the validation loss);
the record the run ends with is `moe.record`. This module owns what happens around the
steps: resources, the writer lock, resume, checkpoints, logging, periodic and final
evaluation, failure marks.

`train_run(cfg, run_dir)` is what `moe train` and every sweep job call. It is
safe to call again on the same directory: it resumes from the newest valid
checkpoint, and a finished run (result.json present) returns its result at
once. On CPU a resumed run ends bit-identical to an uninterrupted one, because
everything a step depends on is in the checkpoint or is a pure function of the
step (data sampling, learning rate).

Token budget: `train.tokens`, or `train.tpp` x *total* parameters (the paper's
convention: sparse models get more tokens than dense ones of equal active size).
Optimizer steps = ceil(tokens / (batch_size * seq_len)).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from moe.checkpoint import run_ids_of, save_checkpoint
from moe.config import RunConfig, config_hash
from moe.data.shards import TokenData, load_data
from moe.errors import EXIT_TRAINING_FAILED, BadConfig, BadInput, UserError
from moe.eval import EvalShard, evaluate_tasks, flat_results, load_tasks
from moe.model import MoELM, precision
from moe.params import resolve_tokens
from moe.record import build_result, task_column
from moe.rundir import RunDir
from moe.train.averaging import WeightEMA, save_snapshot
from moe.train.distributed import Dist
from moe.train.parallel import Parallel, parallelize, shards_weights
from moe.train.preempt import PreemptionWatch, active_watch
from moe.train.progress import Progress
from moe.train.resources import apply_num_threads, check_resources, retain_freed_memory
from moe.train.resume import load_newest, save_sharded_step
from moe.train.schedule import build_optimizer, lr_at, total_steps
from moe.train.signals import StopSignals, Terminated
from moe.train.step import (
    StepStats,
    grad_accum_steps,
    pick_device,
    train_step,
    validation_loss,
)
from moe.train.tracking import Tracker, open_tracker


class TrainingFailed(UserError, RuntimeError):
    """The run diverged (NaN/inf loss); status.json says where and why."""

    exit_code = EXIT_TRAINING_FAILED


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
                raise BadInput(f"{run.path} already holds a different run ({what}; its "
                                 "config.toml differs); use a new --out directory or the "
                                 "same config")
            run.update_status(state="pending", reason="config replaced before any training",
                              step=0)
        elif existing == cfg:
            return
    run.write_config(cfg)


def _progress(cfg: RunConfig, n_steps: int, start: int, enabled: bool) -> Progress | None:
    """A bar on a terminal, else a line every log.progress_every_s (`moe.train.progress`)."""
    if not enabled:
        return None
    return Progress(n_steps, start, cfg.train.batch_size * cfg.model.seq_len,
                    every_s=cfg.log.progress_every_s)


@contextlib.contextmanager
def _in_loop(watch: PreemptionWatch | None, stops: StopSignals) -> Iterator[None]:
    """While the steps run, stop signals wait for the step boundary (a checkpoint first)."""
    for handler in (watch, stops):
        if handler is not None:
            handler.in_loop = True
    try:
        yield
    finally:
        for handler in (watch, stops):
            if handler is not None:
                handler.in_loop = False


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
    if device.type == "cpu":
        retain_freed_memory()
    per_micro = cfg.train.batch_size // grad_accum_steps(cfg, ddp.world)
    if per_micro % ddp.world:
        raise BadConfig(f"train.batch_size / train.grad_accum = {per_micro} sequences must be "
                         f"divisible by the {ddp.world} data-parallel ranks")
    torch.manual_seed(cfg.train.seed)
    model = MoELM(cfg.model).to(device)
    bf16 = precision.uses_bf16(cfg.train.precision, device)
    model, par = parallelize(model, cfg, device, ddp, bf16)
    opt = build_optimizer(model, cfg.train)
    return model, opt, par


def train_run(cfg: RunConfig, run_dir: RunDir | str | os.PathLike, *, progress: bool = False
              ) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) the run in `run_dir`.

    A finished run whose result lacks some of `cfg.eval.tasks` is evaluated on those
    tasks only (nothing is trained) and its result.json gains their columns.

    Before anything is allocated or written the run's memory is estimated and refused
    when the machine (or GPU) cannot hold it. One process at a time trains a directory
    (`RunDir.writer_lock`, held until this returns); a failure once the directory holds
    this run marks it failed with the reason. SIGTERM and SIGHUP end the current step,
    write a checkpoint and raise `Terminated` (`moe.train.signals`); the run is then
    marked failed with the signal as the reason, and a rerun resumes.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    ddp = Dist.current()
    if not run.is_done():  # a finished run only evaluates
        check_resources(cfg, pick_device(cfg.train), ddp.world)
    data = _load_inputs(cfg)  # a missing task file or a typo fails now, before any write
    with run.writer_lock() if ddp.is_main else contextlib.nullcontext(), \
            StopSignals() as stops:
        if ddp.is_main:
            run.clean_stale_tmp()
        try:
            return _train_run(cfg, run, ddp, data, progress, stops)
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
        reason = str(exc) if isinstance(exc, Terminated) else "interrupted" \
            if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        run.update_status(state="failed", reason=reason[:500])
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _load_inputs(cfg: RunConfig) -> TokenData:
    data = load_data(cfg.data, cfg.model.seq_len)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise BadConfig(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                         f"tokenizer's {data.tokenizer.vocab_size} ids")
    if cfg.eval.tasks:
        load_tasks(cfg)
    return data


def _train_run(cfg: RunConfig, run: RunDir, ddp: Dist, data: TokenData, progress: bool,
               stops: StopSignals) -> dict[str, Any]:
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
    t0 = time.time()
    since = (start, t0)  # the last logged step and its time: tokens/s between log rows
    bar = _progress(cfg, n_steps, start, progress and ddp.is_main)
    watch = active_watch()  # under submitit: a stop warning checkpoints at the step's end
    with _in_loop(watch, stops):
        for step in range(start, n_steps):
            lr = lr_at(step, cfg.train, n_steps)
            stats = train_step(model, opt, data, cfg, step, lr, device, ddp, par)
            if not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
                raise _fail(run, ddp, step + 1, f"diverged: non-finite loss or gradient at "
                            f"step {step + 1} (loss {stats.loss:.4g}, grad norm "
                            f"{stats.grad_norm:.4g}, lr {lr:.3g})")
            recent_ce = (recent_ce + [stats.ce])[-20:]
            done = step + 1
            ema.update(_unwrap(model), done)
            if ddp.is_main and cfg.train.save_every and (done % cfg.train.save_every == 0
                                                         or done == n_steps):
                save_snapshot(run, done, _unwrap(model))
            if bar is not None:
                bar.update(done, stats.loss)
            if ddp.is_main and (done % cfg.train.log_every == 0 or done in (1, n_steps)):
                since = _log_step(run, tracker, cfg, done, n_steps, stats, lr, since)
            if cfg.eval.every and cfg.eval.tasks and done % cfg.eval.every == 0 \
                    and done < n_steps:
                _periodic_eval(model, data, cfg, device, run, done, ddp, par, tracker)
            signum = stops.poll(ddp.world, device)  # SIGTERM / SIGHUP on any rank
            stop = watch is not None and watch.poll(ddp.world, device)
            if done % cfg.train.checkpoint_every == 0 or done == n_steps or stop or signum:
                _checkpoint(run, done, model, opt, cfg, ddp, par, recent_ce, ema)
            if signum:
                raise Terminated(signum, step=done)  # train_run marks the run failed
            if stop:
                watch.hand_over(ddp.rank)
    if bar is not None:
        bar.close()
    tracker.close()
    return _finish(run, cfg, model, data, device, ddp, recent_ce,
                   n_steps - start, time.time() - t0, par, ema)


def _log_step(run: RunDir, tracker: Tracker, cfg: RunConfig, done: int, n_steps: int,
              stats: StepStats, lr: float, since: tuple[int, float]) -> tuple[int, float]:
    """Append the metrics row of step `done` and update status.json; returns the new `since`
    (tokens/s is measured over the steps since the previous row)."""
    now = time.time()
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    tps = (done - since[0]) * tokens_per_step / max(now - since[1], 1e-9)
    row = _metrics_row(done, n_steps, cfg, stats, lr, tps)
    run.append_metrics(row)
    tracker.log(row)
    run.update_status(step=done, tokens_done=min(resolve_tokens(cfg), done * tokens_per_step),
                      last_loss=stats.loss)
    return done, now


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
        raise BadInput(f"{run.path} holds the finished run {result.get('run_id')!r}, not "
                         f"{config_hash(cfg)!r}; use a new --out directory or its config")
    missing = [t for t in cfg.eval.tasks if task_column(t) not in result]
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

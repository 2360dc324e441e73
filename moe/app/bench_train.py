"""`moe bench train`: training throughput of one run config on generated tokens.

Runs `--steps` optimizer steps of the config's model -- the step `moe train`
runs (`moe.train.step.optimizer_step`: forward, the training loss, backward, grad
clip, AdamW) -- in the precision training uses (bf16 autocast on CUDA), with its
blocks compiled where training compiles them (`train.compile`: on CUDA), on
uniformly random tokens, after `--warmup` untimed steps (which also run Triton's
autotuning), and reports tokens/s, achieved TFLOP/s (moe.params' training
FLOPs per token: 6 x active parameters plus attention), MFU against the GPU's
dense bf16 peak, and peak memory. The micro-batch is `--micro-batch`, or the
config's per-step batch capped at `--max-tokens` tokens, halved on CUDA out-of-
memory until it fits.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from moe.errors import BadInput, MissingResource

PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0),
                    ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
"""Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's datasheets, by device name."""


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _model_and_opt(cfg, device):
    from moe.model import MoELM
    from moe.train import build_optimizer
    from moe.train.parallel import compile_blocks, compiles

    torch.manual_seed(cfg.train.seed)
    model = MoELM(cfg.model).to(device)
    if compiles(cfg, device):  # as `moe train` runs it (train.compile: on CUDA by default)
        compile_blocks(model)
    return model, build_optimizer(model, cfg.train)


def _step(model, opt, cfg, tokens_BT1: torch.Tensor, device) -> float:
    """One step of `moe train` (`moe.train.step.optimizer_step`) on one micro-batch."""
    from moe.train.step import optimizer_step

    batch = (tokens_BT1[:, :-1], tokens_BT1[:, 1:])
    return optimizer_step(model, opt, lambda _micro: batch, 1, cfg, device).loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(cfg, device, micro_batch: int, seq_len: int, steps: int,
                 warmup: int) -> dict:
    model, opt = _model_and_opt(cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)

    def batch():
        return torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1),
                             device=device, generator=gen)

    for _ in range(warmup):
        _step(model, opt, cfg, batch(), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    losses = [_step(model, opt, cfg, batch(), device) for _ in range(steps)]
    _sync(device)
    elapsed_s = time.perf_counter() - t0
    return {"elapsed_s": elapsed_s, "final_loss": losses[-1],
            "finite": all(math.isfinite(v) for v in losses)}


def bench_train(cfg, *, device: torch.device, steps: int, warmup: int, micro_batch: int | None,
                seq_len: int | None, max_tokens: int, peak: float | None = None) -> dict:
    """Throughput record of `steps` timed training steps (see the module docstring)."""
    from moe.model.experts import auto_backend
    from moe.params import count_params, train_flops_per_token
    from moe.train.parallel import compiles

    seq_len = seq_len or cfg.model.seq_len
    if steps < 1 or warmup < 0 or seq_len < 1 or seq_len > cfg.model.seq_len:
        raise BadInput(f"need --steps >= 1, --warmup >= 0 and 1 <= --seq-len <= "
                         f"model.seq_len={cfg.model.seq_len}")
    batch = micro_batch or max(1, min(cfg.train.batch_size // cfg.train.grad_accum,
                                      max_tokens // seq_len))
    while True:
        try:
            timing = _timed_steps(cfg, device, batch, seq_len, steps, warmup)
            break
        except torch.cuda.OutOfMemoryError:
            if micro_batch is not None or batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
    tokens_per_s = steps * batch * seq_len / timing["elapsed_s"]
    tflops = tokens_per_s * train_flops_per_token(cfg.model, seq_len) / 1e12
    peak = peak if peak is not None else peak_tflops(device)
    backend = cfg.model.experts_backend
    return {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "experts_backend": auto_backend(device) if backend == "auto" else backend,
        "compiled": compiles(cfg, device),
        "n_params_active": count_params(cfg.model).active, "steps": steps,
        "warmup_steps": warmup, "micro_batch": batch, "seq_len": seq_len,
        "tokens_per_s": tokens_per_s, "tflops": tflops,
        "mfu": None if peak is None else tflops / peak, "peak_tflops": peak,
        "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                           if device.type == "cuda" else None),
        **timing,
    }


def _handle(args) -> int:
    from moe.config import load_config

    cfg = load_config(args.config, args.set or [])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MissingResource("--device cuda but CUDA is not available; use --device cpu")
    device = torch.device(args.device if args.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    record = {"config": str(args.config), **bench_train(
        cfg, device=device, steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch,
        seq_len=args.seq_len, max_tokens=args.max_tokens, peak=args.peak_tflops)}
    mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
    print(f"{Path(args.config).name}: {record['tokens_per_s']:.0f} tokens/s, "
          f"{record['tflops']:.2f} TFLOP/s, MFU {mfu}, micro-batch {record['micro_batch']}x"
          f"{record['seq_len']}, backend {record['experts_backend']}, final loss "
          f"{record['final_loss']:.3f}")
    if args.out:
        from moe.io import atomic_write_json

        atomic_write_json(Path(args.out), record)
    if not record["finite"]:
        from moe.train.loop import TrainingFailed

        raise TrainingFailed("the loss was not finite in every step")
    return 0


def register(bench_sub) -> None:
    """Add `bench train` to the `bench` subparsers object."""
    p = bench_sub.add_parser(
        "train", help="training throughput (tokens/s, MFU, peak memory) on generated tokens",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("config", help="run config TOML")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=100, help="timed steps (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--micro-batch", type=int, help="sequences per step (default: see above)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default model.seq_len)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="cap on tokens per step for the default micro-batch (default 16384)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--peak-tflops", type=float, help="GPU's dense bf16 peak for MFU "
                   "(default: from the device name for A100/H100/H200)")
    p.add_argument("-o", "--out", help="write the record as JSON here")
    p.set_defaults(func=_handle)


"""Weight averages kept while training: an EMA of the weights, and snapshots for merging.

**EMA** (`train.ema_decay` = d > 0, `train.ema_start` = s). After optimizer step
s0 = max(s, 1) the EMA is a copy of the weights; after every later step t it becomes
d * ema + (1 - d) * theta_t, so after step n

    ema_n = d^(n - s0) theta_s0 + sum_{t = s0+1}^{n} (1 - d) d^(n - t) theta_t.

It lives in the resume checkpoint (key "ema"), so a resumed run ends with the same
EMA as an uninterrupted one, and at the end it is evaluated and written as the run
directory RUN_DIR/ema/ (`RunDir.ema_run`), which `moe eval` accepts.

**Snapshots** (`train.save_every` = m > 0): the weights every m steps (and at the last
step) go to RUN_DIR/snapshots/ (`RunDir.list_snapshots`), apart from the resume
checkpoints and never pruned: they are what `moe merge` averages.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from moe.checkpoint import load_verified, save_checkpoint
from moe.config import config_hash
from moe.errors import BadInput
from moe.rundir import RunDir


def ema_update(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
               decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, in place, for floating-point tensors."""
    for name, w in weights.items():
        if w.is_floating_point():
            ema[name].mul_(decay).add_(w.detach(), alpha=1.0 - decay)
        else:
            ema[name].copy_(w)


class WeightEMA:
    """The EMA of a model's weights (inactive when decay is 0)."""

    def __init__(self, decay: float, start: int) -> None:
        self.decay, self.start = decay, max(1, start)
        self.shadow: dict[str, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def update(self, model: torch.nn.Module, done: int) -> None:
        """Fold in the weights after optimizer step `done` (1-based)."""
        if not self.enabled or done < self.start:
            return
        weights = model.state_dict()
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in weights.items()}
        else:
            ema_update(self.shadow, weights, self.decay)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        self.shadow = None if state is None else {k: v.clone() for k, v in state.items()}


def save_snapshot(run: RunDir, step: int, model: torch.nn.Module) -> None:
    """The model's weights at `step`, atomically with their SHA-256, for `moe merge`."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "step": step}, buffer)
    data = buffer.getvalue()
    run.write_snapshot(step, data, hashlib.sha256(data).hexdigest())


def load_snapshot(run: RunDir, step: int, path, map_location: str | torch.device = "cpu"
                  ) -> dict[str, Any]:
    """A verified snapshot ({"model", "step"}); ValueError naming the file when damaged."""
    try:
        return load_verified(run, step, path, map_location, None)
    except ValueError as exc:
        raise BadInput(f"snapshot {path} (step {step}) is unusable: {exc}") from None


def write_weights_run(run: RunDir, cfg, step: int, weights: dict[str, torch.Tensor],
                      result: dict[str, Any]) -> RunDir:
    """A finished run directory holding `weights`: config.toml, one checkpoint, result.json.

    `moe eval` and `moe export` read it like any trained run; `moe train` on it returns
    `result` (a run is finished when result.json exists).
    """
    run.write_config(cfg)
    save_checkpoint(run, step, {"model": weights, "step": step, "run_id": config_hash(cfg)},
                    keep=1)
    run.write_result(result)
    run.update_status(state="done", step=step, reason=None)
    return run

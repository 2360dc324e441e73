"""Recipe options inside training: the EMA of the weights (closed form, checkpointed,
resumed exactly), merge snapshots, the curriculum order, repeated data and min_lr_frac."""

import shutil
import warnings

import numpy as np
import pytest
import torch

from helpers import tiny_config
from moe.checkpoint import load_latest_checkpoint
from moe.config import ConfigError, TrainConfig, config_hash
from moe.config.run_id import weight_fields
from moe.rundir import RunDir
from moe.train import lr_at, train_run
from moe.train.averaging import WeightEMA, load_snapshot


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("start", [0, 3])
def test_ema_equals_its_closed_form_on_a_toy_sequence(start):
    decay, n = 0.8, 9
    thetas = torch.randn(n + 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model, ema = _Toy(), WeightEMA(decay, start)
    for t in range(1, n + 1):
        with torch.no_grad():
            model.w.copy_(thetas[t])
        ema.update(model, t)
    s0 = max(start, 1)  # the EMA is a copy of the weights after step s0
    closed = decay ** (n - s0) * thetas[s0] + sum(
        (1 - decay) * decay ** (n - t) * thetas[t] for t in range(s0 + 1, n + 1))
    torch.testing.assert_close(ema.state_dict()["w"], closed, rtol=1e-12, atol=1e-12)


def test_ema_is_off_by_default_and_validated():
    assert not WeightEMA(0.0, 0).enabled
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_ema_is_checkpointed_evaluated_saved_and_resumes_exactly(tmp_path):
    cfg = tiny_config("train.ema_decay=0.9", "train.ema_start=4", "train.keep_checkpoints=4",
                      "train.save_every=8")
    straight = tmp_path / "straight"
    result = train_run(cfg, straight)
    assert np.isfinite(result["val_loss_ema"]) and result["val_loss_ema"] != result["val_loss"]
    ema_run = RunDir(straight).ema_run()
    assert ema_run.read_result()["val_loss"] == result["val_loss_ema"]
    final = load_latest_checkpoint(straight)
    torch.testing.assert_close(load_latest_checkpoint(ema_run.path)["model"], final["ema"],
                               rtol=0, atol=0)
    # snapshots every 8 steps, kept apart from the pruned resume checkpoints
    assert [s for s, _ in RunDir(straight).list_snapshots()] == [8, 16, 24, 32]
    assert load_snapshot(RunDir(straight).snapshot_path(32))["step"] == 32
    # resume from an earlier checkpoint: the same raw weights and the same EMA
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "result.json").unlink()
    for _, path in RunDir(resumed).list_checkpoints()[:2]:
        path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = train_run(cfg, resumed)
    assert again["val_loss_ema"] == result["val_loss_ema"]
    other = load_latest_checkpoint(resumed)
    for name, tensor in final["ema"].items():
        assert torch.equal(tensor, other["ema"][name]), name


def test_new_options_keep_old_run_ids_and_min_lr_frac():
    base = tiny_config()
    hashed = weight_fields(base)  # fields added later at their defaults are not hashed
    assert not {"ema_decay", "ema_start", "min_lr_frac"} & set(hashed["train"])
    assert not {"order", "pocket_noise", "unique_tokens"} & set(hashed["data"])
    assert config_hash(tiny_config("train.save_every=4")) == config_hash(base)
    assert config_hash(tiny_config("train.ema_decay=0.9")) != config_hash(base)
    tcfg = TrainConfig(lr=3e-3, min_lr=0.0, min_lr_frac=1 / 3, warmup_steps=0)
    assert lr_at(99, tcfg, 100) == pytest.approx(1e-3)

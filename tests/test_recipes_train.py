"""Recipe options inside training: the EMA of the weights (closed form, checkpointed,
resumed exactly), merge snapshots, the curriculum order, repeated data and min_lr_frac."""

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_config
from moe.checkpoint import load_latest_checkpoint
from moe.config import ConfigError, DataConfig, TrainConfig, config_hash
from moe.config.run_id import weight_fields
from moe.data.curriculum import ordered_split
from moe.data.pocket import build_pocket
from moe.data.shards import load_data
from moe.rundir import RunDir
from moe.sweeps import load_spec, plan
from moe.train import lr_at, train_run
from moe.train.averaging import WeightEMA, load_snapshot

ROOT = Path(__file__).resolve().parents[1]


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
    result, again, straight, resumed = _resume_from_earlier(cfg, tmp_path)
    assert np.isfinite(result["val_loss_ema"]) and result["val_loss_ema"] != result["val_loss"]
    ema_run = RunDir(straight).ema_run()
    assert ema_run.read_result()["val_loss"] == result["val_loss_ema"]
    final = load_latest_checkpoint(straight)
    torch.testing.assert_close(load_latest_checkpoint(ema_run.path)["model"], final["ema"],
                               rtol=0, atol=0)
    # snapshots every 8 steps, kept apart from the pruned resume checkpoints
    assert [s for s, _ in RunDir(straight).list_snapshots()] == [8, 16, 24, 32]
    assert load_snapshot(RunDir(straight), 32, RunDir(straight).snapshot_path(32))["step"] == 32
    # resumed from an earlier checkpoint: the same EMA
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


def _resume_from_earlier(cfg, tmp_path):
    """Train straight; copy; drop the result and the two newest checkpoints; resume."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train_run(cfg, straight)
    shutil.copytree(straight, resumed)
    (resumed / "result.json").unlink()
    for _, path in RunDir(resumed).list_checkpoints()[:2]:
        path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return result, train_run(cfg, resumed), straight, resumed


def test_pocket_noise_corrupts_a_fraction_and_leaves_the_clean_corpus_alone():
    clean = build_pocket(DataConfig())
    noisy = build_pocket(DataConfig(pocket_noise=0.3))
    levels = np.asarray(noisy.noise)
    assert (levels > 0).sum() == round(0.3 * len(clean.documents))
    assert np.all((levels == 0) | ((levels >= 0.05) & (levels <= 0.5)))
    same = [a == b for a, b in zip(clean.documents, noisy.documents, strict=True)]
    assert all(s for s, lv in zip(same, levels, strict=True) if lv == 0)
    assert sum(same) < len(same) - 0.9 * (levels > 0).sum()
    assert set(clean.noise) == {0.0} and clean.memorization_eval == noisy.memorization_eval


def test_ordered_split_is_ascending_quality_by_a_dumb_reference():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 9, size=rng.integers(3, 12)) for _ in range(40)]
    tokens = np.concatenate([np.append(d, 99) for d in docs])
    quality = rng.choice([-0.3, -0.1, 0.0, 0.0, 0.0], size=len(docs))
    split = ordered_split(tokens, quality, eos_id=99, seq_len=8)
    ties = np.random.default_rng([5, 7]).permutation(len(docs))
    ref = sorted(range(len(docs)), key=lambda d: (quality[d], ties[d]))
    expected = np.concatenate([np.append(docs[d], 99) for d in ref])
    np.testing.assert_array_equal(split.stream(5), expected)
    x, y = split.batch(5, 2, 3)  # windows 6, 7, 8 of the stream
    for b in range(3):
        np.testing.assert_array_equal(x[b].numpy(), expected[(6 + b) * 8: (7 + b) * 8])
        np.testing.assert_array_equal(y[b].numpy(), expected[(6 + b) * 8 + 1: (7 + b) * 8 + 1])
    assert not np.array_equal(split.stream(6), expected)  # another seed, another tie order


def test_curriculum_batches_are_a_pure_function_of_seed_and_step():
    cfg = DataConfig(pocket_noise=0.3, order="ascending-quality", pocket_entities=40,
                     pocket_arith_problems=300)
    a, b = load_data(cfg, 32), load_data(cfg, 32)
    for i in (0, 17, 5):
        assert all(torch.equal(u, v) for u, v in zip(a.train.batch(3, i, 4), b.train.batch(3, i, 4),
                                                     strict=True))
    shuffled = load_data(dataclasses.replace(cfg, order="shuffled"), 32)
    assert torch.equal(a.val.batch(0, 0, 4)[0], shuffled.val.batch(0, 0, 4)[0])
    assert a.train.n_tokens == shuffled.train.n_tokens
    # the noisy documents come first: early windows are noisier than late ones
    noise = np.asarray(build_pocket(cfg).noise)
    assert noise[a.train.order(3)][0] == noise.max() and noise[a.train.order(3)][-1] == 0


def test_curriculum_run_resumes_exactly(tmp_path):
    cfg = tiny_config("data.pocket_noise=0.3", 'data.order="ascending-quality"',
                      "train.keep_checkpoints=4")
    result, again, straight, resumed = _resume_from_earlier(cfg, tmp_path)
    assert again["val_loss"] == result["val_loss"]
    a, b = load_latest_checkpoint(straight)["model"], load_latest_checkpoint(resumed)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unique_tokens_repeat_a_fixed_budget(tmp_path):
    cfg = tiny_config("data.unique_tokens=2048")
    data = load_data(cfg.data, cfg.model.seq_len)
    assert data.train.n_tokens == 2048
    result = train_run(cfg, tmp_path)
    assert result["epochs"] == pytest.approx(8192 / 2048)
    with pytest.raises(ValueError, match="unique_tokens"):
        load_data(dataclasses.replace(cfg.data, unique_tokens=10**9), 32)


@pytest.mark.parametrize("name, n_runs", [("wsm", 9), ("curriculum", 12),
                                          ("data-constrained", 13)])
def test_recipe_sweeps_plan(name, n_runs):
    runs = plan(load_spec(ROOT / "sweeps" / "recipes" / f"{name}.toml"))
    assert len(runs) == n_runs
    cfg = runs[0].config
    if name == "wsm":
        assert {r.config.train.schedule for r in runs} == {"constant", "cosine", "wsd"}
        assert all(r.config.train.save_every for r in runs)
    if name == "curriculum":  # one pass at most, so the run ends on the cleanest data
        data = load_data(cfg.data, cfg.model.seq_len)
        assert all(r.config.train.tokens <= data.train.n_tokens for r in runs)
    if name == "data-constrained":
        assert {r.config.data.unique_tokens for r in runs} == {20_000}

"""Config contract: TOML round trip, overrides, and every error a user can make."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from moe.config import (
    ConfigError,
    ConfigNotice,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_toml_round_trip_and_hash(tmp_path):
    cfg = apply_overrides(RunConfig(), ["model.n_experts=16", "model.top_k=4",
                                        'eval.tasks=["pocket-memorization"]', "train.tokens=1e6"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(apply_overrides(cfg, ["train.seed=1"])) != config_hash(cfg)
    assert again.train.tokens == 1_000_000 and again.train.tpp is None


def test_set_switching_the_budget_mode_says_what_it_replaced():
    path = ROOT / "configs" / "pocket-tiny.toml"  # gives train.tokens = 1_000_000
    with pytest.warns(ConfigNotice, match=r"--set train.tpp=5 replaces train.tokens=1000000"):
        cfg = load_config(path, ["train.tpp=5"])
    assert cfg.train.tpp == 5.0 and cfg.train.tokens is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same key as the file: nothing replaced, no notice
        assert load_config(path, ["train.tokens=2e6"]).train.tokens == 2_000_000


def test_set_giving_both_budget_keys_is_refused_like_a_file_giving_both(tmp_path):
    with pytest.raises(ConfigError, match="train.tokens and train.tpp"):
        load_config(ROOT / "configs" / "pocket-tiny.toml", ["train.tpp=5", "train.tokens=1e6"])
    both = tmp_path / "both.toml"
    both.write_text("[train]\ntokens = 1000\ntpp = 5\n")
    with pytest.raises(ConfigError, match="tokens and tpp"):
        load_config(both)


@pytest.mark.parametrize("overrides,match", [
    (["model.n_expert=4"], "unknown config key 'model.n_expert'.*n_experts"),
    (["modle.d_model=4"], "unknown config key"),
    (["model.d_model=big"], "model.d_model must be an integer"),
    (["model.tie_embeddings=1"], "true or false"),
    (["model.top_k=9"], "top_k=9 must be <= model.n_experts=8"),
    (["model.d_model=30", "model.n_heads=4"], "divisible by model.n_heads"),
    (["model.experts_backend=cuda"], "must be one of auto, loop"),
    (["train.lr=-1"], "train.lr=-1.0 must be positive"),
    (["nonsense"], "KEY=VALUE"),
])
def test_bad_overrides(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "pocket-tiny.toml", overrides)


@pytest.mark.parametrize("train,match", [
    ({"tokens": 10, "tpp": 20}, "got tokens and tpp"),
    ({"batch_size": 4}, "got neither"),
])
def test_budget_needs_exactly_one(train, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"train": train})


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section"):
        config_from_dict({"optim": {}, "train": {"tpp": 20}})


@pytest.mark.parametrize("args,match", [
    (["--set", "model.top_k=99"], "top_k=99"),
    (["--set", "model.colour=3"], "unknown config key"),
    (["--set", "train.tpp=3", "--set", "train.seed=x"], "train.seed must be an integer"),
    (["--set", "train.tpp=3", "--set", "train.tokens=1e6"], "both train.tokens and train.tpp"),
])
def test_cli_config_errors_are_one_line_and_write_nothing(tmp_path, args, match):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "moe.app.cli", "train",
                           str(ROOT / "configs" / "pocket-tiny.toml"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert not out.exists()


def test_cli_missing_config_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe.app.cli", "train", str(tmp_path / "no.toml"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "config file not found" in proc.stderr

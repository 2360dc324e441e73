"""`moe.checkpoint_dcp`: sharded checkpoints carry a SHA-256 manifest and a damaged one is
skipped for the previous one, like a `.pt` checkpoint."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import tiny_config
from moe.app.cli import main
from moe.checkpoint import load_run_model
from moe.checkpoint_dcp import MANIFEST, save_sharded
from moe.config import config_hash
from moe.model import MoELM
from moe.rundir import RunDir
from moe.train.distributed import Dist
from moe.train.parallel import Parallel
from moe.train.resume import load_newest
from moe.train.schedule import build_optimizer


@pytest.fixture
def sharded_run(tmp_path):
    """A run directory with sharded checkpoints at steps 10 and 20 of two different models;
    returns (run, {step: the model's own tensors})."""
    cfg = tiny_config()
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    weights = {}
    for step, seed in ((10, 1), (20, 2)):
        torch.manual_seed(seed)
        model = MoELM(cfg.model)
        opt = build_optimizer(model, cfg.train)
        extra = {"step": step, "rng_cpu": torch.get_rng_state(), "run_id": config_hash(cfg),
                 "recent_ce": "[]"}
        save_sharded(run, step, model, opt, extra, {}, keep=2)
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return run, weights


def _damage_one_shard(directory) -> str:
    """Flip 64 bytes every 4 KiB of the largest .distcp file (as the fault probe did)."""
    shard = max(directory.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    for at in range(0, len(data) - 64, 4096):
        data[at: at + 64] = bytes(b ^ 0xFF for b in data[at: at + 64])
    shard.write_bytes(bytes(data))
    return shard.name


def _assert_weights(model, want) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[name]), name


def test_manifest_lists_every_file_with_its_sha256(sharded_run):
    import hashlib

    run, _ = sharded_run
    for _, path in run.list_sharded_checkpoints():
        listed = json.loads((path / MANIFEST).read_text())["sha256"]
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in path.iterdir() if p.name != MANIFEST}
        assert listed == files and any(n.endswith(".distcp") for n in files)
    assert not list(run.checkpoints_dir.glob("*.partial"))


def test_intact_sharded_checkpoint_loads_the_saved_weights(sharded_run):
    run, weights = sharded_run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        model, _, step = load_run_model(run.path)
    assert step == 20
    _assert_weights(model, weights[20])


def test_damaged_shard_is_skipped_with_a_warning_naming_it(sharded_run):
    run, weights = sharded_run
    name = _damage_one_shard(run.sharded_checkpoint_path(20))
    with pytest.warns(UserWarning, match=rf"step 20.*{name}.*does not match its SHA-256"):
        model, _, step = load_run_model(run.path)  # what `moe eval` and `moe export` load
    assert step == 10
    _assert_weights(model, weights[10])
    cfg = run.read_config()  # resuming also falls back to step 10
    fresh = MoELM(cfg.model)
    with pytest.warns(UserWarning, match=name):
        step, _ = load_newest(run, fresh, build_optimizer(fresh, cfg.train), "cpu", Dist(),
                              Parallel(), cfg)
    assert step == 10
    _assert_weights(fresh, weights[10])


def test_missing_manifest_or_file_is_unusable_and_none_left_is_exit_2(sharded_run, capsys):
    run, _ = sharded_run
    (run.sharded_checkpoint_path(20) / MANIFEST).unlink()  # e.g. written before publication
    next(run.sharded_checkpoint_path(10).glob("*.distcp")).unlink()
    with pytest.warns(UserWarning) as seen:
        assert main(["export", str(run.path), "--out", str(run.path.parent / "hf")]) == 2
    said = " ".join(str(w.message) for w in seen)
    assert "no readable sha256.json" in said and ".distcp is missing" in said
    assert "no loadable checkpoint" in capsys.readouterr().err

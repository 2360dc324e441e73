"""`moe.checkpoint`: a checkpoint is used only when its digest verifies, its stored step is
its file's, its run id is the run's and its tensors fit the model; otherwise it is skipped
with a warning naming why and the previous one is used. Pruning keeps verified ones."""

from __future__ import annotations

import hashlib
import io
import shutil
import warnings

import pytest
import torch

from helpers import tiny_config
from moe.checkpoint import load_latest_checkpoint, load_run_model, save_checkpoint
from moe.config import legacy_config_hash
from moe.rundir import RunDir
from moe.train import train_run

CFG = tiny_config("train.checkpoint_every=8", "train.keep_checkpoints=3")  # 32 steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    train_run(CFG, run_dir)
    return run_dir


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return RunDir(tmp_path / "run")


def _state(run: RunDir, step: int) -> dict:
    return torch.load(run.checkpoint_path(step), weights_only=True)


def _bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _newest(run: RunDir, **kwargs) -> int:
    state = load_latest_checkpoint(run, **kwargs)
    return None if state is None else int(state["step"])


def test_checkpoint_without_digest_is_not_trusted(run):
    """A crash between data and digest used to leave a loadable, unverified file; one with
    NaN weights then wedged every relaunch as diverged."""
    state = _state(run, 32)
    state["step"] = 40
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    run.checkpoint_path(40).write_bytes(_bytes(state))  # no .sha256 beside it
    with pytest.warns(UserWarning, match="no .sha256 digest"):
        assert _newest(run) == 32


def test_crash_between_the_two_writes_leaves_no_trusted_checkpoint(run, monkeypatch):
    """Whichever of digest and data is written second never lands (the process dies)."""
    import moe.io

    real = moe.io.atomic_write_bytes
    calls = []

    def dies_on_second_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise SystemExit("killed")
        return real(path, data)

    monkeypatch.setattr("moe.rundir.atomic_write_bytes", dies_on_second_write)
    monkeypatch.setattr("moe.rundir.atomic_write_text",
                        lambda path, text: dies_on_second_write(path, text.encode()))
    state = _state(run, 32)
    state["step"] = 40
    with pytest.raises(SystemExit):
        save_checkpoint(run, 40, state, keep=3)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _newest(run) == 32


def test_checkpoint_of_another_run_is_skipped(run):
    state = _state(run, 32)
    state["step"], state["run_id"] = 40, "0123456789"
    save_checkpoint(run, 40, state, keep=10)
    with pytest.warns(UserWarning, match="belongs to run '0123456789'"):
        assert _newest(run) == 32


def test_checkpoint_of_a_version_0_1_run_dir_is_accepted(run):
    state = _state(run, 32)
    state["step"], state["run_id"] = 40, legacy_config_hash(CFG)
    save_checkpoint(run, 40, state, keep=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _newest(run) == 40


def test_model_of_a_version_0_1_checkpoint_with_separate_gate_and_up_loads(run):
    """0.1 stored each expert layer's gate (w1) and up (w3) weights apart; the fused layout
    must still read them (the fit check sees the converted tensors)."""
    state = _state(run, 32)
    want = load_run_model(run.path)[0].state_dict()
    for key in [k for k in state["model"] if k.endswith("w13_ED2H")]:
        w1, w3 = state["model"].pop(key).chunk(2, dim=-1)
        prefix = key[: -len("w13_ED2H")]
        state["model"][prefix + "w1_EDH"], state["model"][prefix + "w3_EDH"] = w1, w3
    state["step"], state["run_id"] = 40, legacy_config_hash(CFG)
    save_checkpoint(run, 40, state, keep=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _, step = load_run_model(run.path)
    assert step == 40
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_stored_step_must_match_the_file_name(run):
    state = _state(run, 16)  # step 16's weights under a newer name
    save_checkpoint(run, 40, state, keep=10)
    with pytest.warns(UserWarning, match="stores step 16, its file name says 40"):
        assert _newest(run) == 32


def _misfit(run: RunDir, step: int) -> None:
    """Replace checkpoint `step` by a verified one of this run whose tensors are too wide."""
    state = _state(run, step)
    state["model"] = {k: torch.zeros(*(2 * s for s in v.shape)) if v.dim() else v
                      for k, v in state["model"].items()}
    save_checkpoint(run, step, state, keep=10)


def test_checkpoint_that_does_not_fit_the_model_is_skipped(run):
    _misfit(run, 32)
    with pytest.warns(UserWarning, match="has shape .* the model's is"):
        _, _, step = load_run_model(run.path)
    assert step == 24


def test_resume_falls_back_past_a_checkpoint_that_does_not_fit(run, trained):
    _misfit(run, 32)
    run.result_path.unlink()
    with pytest.warns(UserWarning, match="the model's is"):
        result = train_run(CFG, run.path)
    reference = RunDir(trained).read_result()
    assert result["val_loss"] == reference["val_loss"]  # resumed from 24, reproduced 32


def _corrupt(run: RunDir, step: int) -> None:
    path = run.checkpoint_path(step)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit: still the right size, digest kept
    path.write_bytes(bytes(data))


def test_pruning_keeps_the_newest_verified_checkpoints(run):
    _corrupt(run, 32)
    _corrupt(run, 24)
    state = _state(run, 16)
    state["step"] = 40
    save_checkpoint(run, 40, state, keep=2)
    verified = [s for s, p in run.list_checkpoints() if run.is_verified(p)]
    assert verified[:2] == [40, 16], "the newest good checkpoints must survive pruning"
    # older than the oldest kept verified one: deleted, with their digests
    assert [s for s, _ in run.list_checkpoints()] == [40, 32, 24, 16]
    assert sorted(p.name for p in run.checkpoints_dir.glob("*.sha256")) == [
        f"step-{s:08d}.sha256" for s in (16, 24, 32, 40)]


def test_digest_is_written_before_the_data(run, monkeypatch):
    order = []
    import moe.rundir

    real_bytes, real_text = moe.rundir.atomic_write_bytes, moe.rundir.atomic_write_text
    monkeypatch.setattr("moe.rundir.atomic_write_bytes",
                        lambda p, d: (order.append(p.suffix), real_bytes(p, d))[1])
    monkeypatch.setattr("moe.rundir.atomic_write_text",
                        lambda p, t: (order.append(p.suffix), real_text(p, t))[1])
    data = b"checkpoint bytes"
    run.write_checkpoint(48, data, hashlib.sha256(data).hexdigest())
    assert order == [".sha256", ".pt"]

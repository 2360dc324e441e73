"""`moe merge` (WSM, Theorem 3.1) and `moe ensemble` (logit averaging)."""

import json

import numpy as np
import pytest
import torch

from helpers import tiny_config
from moe.app import recipes_cmd
from moe.app.cli import main
from moe.checkpoint import load_latest_checkpoint, load_run_model
from moe.data.shards import load_data
from moe.model import MoELM
from moe.recipes import DECAYS, LogitAverage, merge_coefficients, target_coefficients
from moe.recipes.merge import SHAPES
from moe.recipes.stats import validation_stats
from moe.rundir import RunDir
from moe.train import train_run, validation_loss
from moe.train.averaging import load_snapshot

CPU = torch.device("cpu")


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("steps", [[40, 50, 60, 70, 80, 90], [0, 7, 14], [100, 103, 111, 130]])
def test_merge_weights_reproduce_the_target_decay(decay, steps):
    """Theorem 3.1: sum_j c_j theta_j = theta_0 - sum_i w_i (updates of interval i)."""
    c = merge_coefficients(steps, decay)
    w = target_coefficients(steps, decay)
    assert c.sum() == pytest.approx(1.0) and np.all(c >= 0)
    assert np.all(np.diff(w) <= 1e-12) and np.all((w >= 0) & (w <= 1))
    # a dumb simulation: one random update per step, snapshots at `steps`
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(steps[-1] - steps[0], 5))
    theta0 = rng.normal(size=5)
    thetas = [theta0 - updates[: s - steps[0]].sum(0) for s in steps]
    merged = sum(cj * th for cj, th in zip(c, thetas, strict=True))
    expected = theta0.copy()
    for i in range(1, len(steps)):
        expected -= w[i - 1] * updates[steps[i - 1] - steps[0]: steps[i] - steps[0]].sum(0)
    np.testing.assert_allclose(merged, expected, rtol=1e-12, atol=1e-12)
    # the targets are the decay shape at the interval ends (mean: the plain average)
    if decay == "mean":
        np.testing.assert_allclose(c, np.full(len(steps), 1 / len(steps)))
    else:
        span = steps[-1] - steps[0]
        x = (np.asarray(steps[1:]) - steps[0]) / (span + span / (len(steps) - 1))
        np.testing.assert_allclose(w, SHAPES[decay](x))


def test_linear_decay_on_even_snapshots_is_the_mean():
    steps = list(range(0, 101, 10))
    np.testing.assert_allclose(merge_coefficients(steps, "linear"),
                               merge_coefficients(steps, "mean"), atol=1e-15)
    assert not np.allclose(merge_coefficients(steps, "cosine"), merge_coefficients(steps, "mean"))


def test_bad_decay_and_cli_choices():
    assert recipes_cmd.DECAYS == DECAYS
    with pytest.raises(ValueError, match="unknown decay"):
        merge_coefficients([1, 2], "exp")


@pytest.fixture(scope="module")
def constant_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsm")
    cfg = tiny_config("train.schedule=constant", "train.save_every=4",
                      "eval.tasks=[\"pocket-memorization\"]", "eval.max_items=8",
                      "eval.accuracy=false")
    train_run(cfg, root / "run")
    return root


@pytest.mark.parametrize("window, why", [
    ("0", "positive number of steps"),  # nothing merged
    ("3", "only the last snapshot"),  # snapshots every 4 steps: one in the window
    ("33", "longer than the run"),  # the run has 32 steps
])
def test_window_that_merges_nothing_or_outlasts_the_run_is_refused(constant_run, tmp_path,
                                                                   capsys, window, why):
    out = tmp_path / "merged"
    assert main(["merge", str(constant_run / "run"), "--window", window, "--decay", "cosine",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert why in err and window in err  # names the value and what is wrong with it
    assert not out.exists()


def test_the_shortest_window_merges_the_last_two_snapshots(constant_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(constant_run / "run"), "--window", "4", "--decay", "mean",
                 "--out", str(out)]) == 0
    src = RunDir(constant_run / "run")
    (s1, p1), (s2, p2) = src.list_snapshots()[-2:]
    a, b = load_snapshot(src, s1, p1)["model"], load_snapshot(src, s2, p2)["model"]
    merged = load_latest_checkpoint(out)["model"]
    for name, tensor in b.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(merged[name], (a[name] + tensor) / 2)
    assert json.loads((out / "result.json").read_text())["merge.k"] == 1


def test_merge_and_ensemble_refuse_a_directory_holding_other_files(constant_run, tmp_path,
                                                                   capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone's files")
    run = str(constant_run / "run")
    assert main(["merge", run, "--window", "8", "--out", str(busy)]) == 2
    assert main(["ensemble", run, run, "--out", str(busy)]) == 2
    err = capsys.readouterr().err
    assert err.count(str(busy)) == 2 and "--force" in err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]  # nothing written
    assert main(["ensemble", run, run, "--out", str(busy), "--force"]) == 0
    assert (busy / "result.json").is_file()


def test_merged_run_is_a_run_directory(constant_run, tmp_path):
    out = tmp_path / "merged"
    main(["merge", str(constant_run / "run"), "--window", "16", "--decay", "mean",
          "--out", str(out)])
    record = json.loads((out / "result.json").read_text())
    assert record["merge.k"] == 4 and record["merge.first_step"] == 16
    snaps = [load_snapshot(RunDir(constant_run / "run"), s, p)["model"]
             for s, p in RunDir(constant_run / "run").list_snapshots()
             if s >= 16]
    model, cfg, step = load_run_model(out)  # what `moe eval` and `moe export` load
    assert step == 32
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, sum(s[name] for s in snaps) / 5)
    data = load_data(cfg.data, cfg.model.seq_len)
    assert record["val_loss"] == pytest.approx(validation_loss(model, data, cfg, CPU))
    assert len([k for k in record if k.startswith("expert_load/")]) == cfg.model.n_layers
    assert "task/pocket-memorization/loss" in record
    assert main(["merge", str(constant_run / "run"), "--window", "8", "--out", str(out)]) == 2


def test_validation_stats_loss_is_the_validation_loss_and_load_is_bounded(constant_run):
    model, cfg, _ = load_run_model(constant_run / "run")
    data = load_data(cfg.data, cfg.model.seq_len)
    stats = validation_stats(model, data, cfg)
    assert stats["val_loss"] == pytest.approx(validation_loss(model, data, cfg, CPU))
    for i in range(cfg.model.n_layers):
        assert 1.0 <= stats[f"expert_load/{i}"] <= cfg.model.n_experts


def _two_models():
    cfg = tiny_config()
    torch.manual_seed(1)
    a = MoELM(cfg.model).eval()
    torch.manual_seed(2)
    b = MoELM(cfg.model).eval()
    for m, scale in ((a, 3.0), (b, 0.5)):  # make their distributions differ a lot
        with torch.no_grad():
            m.head.weight.mul_(scale * 40)
    return cfg, a, b


def test_logit_average_of_identical_models_is_the_model():
    cfg, a, _ = _two_models()
    idx = torch.randint(0, cfg.model.vocab_size, (3, 16))
    torch.testing.assert_close(LogitAverage([a, a, a])(idx).logits_BTV, a(idx).logits_BTV.float())


def test_logit_average_loss_is_below_the_members_mean_not_their_best():
    """CE is convex in the logits: per token CE(mean z) = mean CE(z_k) - gap, gap >= 0."""
    cfg, a, b = _two_models()
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, cfg.model.vocab_size, (4, 32), generator=gen)
    tgt = torch.randint(0, cfg.model.vocab_size, (4, 32), generator=gen)
    with torch.no_grad():
        za, zb = a(idx).logits_BTV.double(), b(idx).logits_BTV.double()
        ens = LogitAverage([a, b])(idx, tgt)
    ce = lambda z: torch.nn.functional.cross_entropy(z.flatten(0, 1), tgt.flatten(),  # noqa: E731
                                                     reduction="none")
    gap = 0.5 * (za.logsumexp(-1) + zb.logsumexp(-1)) - (0.5 * (za + zb)).logsumexp(-1)
    torch.testing.assert_close(ce(0.5 * (za + zb)), 0.5 * (ce(za) + ce(zb)) - gap.flatten())
    assert torch.all(gap >= -1e-12)
    assert float(ens.ce_loss) <= 0.5 * float(ce(za).mean() + ce(zb).mean()) + 1e-6
    # ... but not below the best member: here a is confidently wrong, b nearly uniform
    assert float(ens.ce_loss) > float(ce(zb).mean())
    # probability averaging has the same guarantee (convexity of -log)
    prob_avg = -torch.log(0.5 * (za.softmax(-1) + zb.softmax(-1))).gather(
        -1, tgt.unsqueeze(-1)).mean()
    assert float(prob_avg) <= 0.5 * float(ce(za).mean() + ce(zb).mean())


def test_ensemble_command_writes_member_and_ensemble_losses(constant_run, tmp_path):
    run = constant_run / "run"
    out = tmp_path / "ens"
    assert main(["ensemble", str(run), str(run), "--out", str(out)]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["ensemble.k"] == 2
    assert record["val_loss"] == pytest.approx(record["member/0/val_loss"], rel=1e-6)
    assert record["member/0/val_loss"] == record["member/1/val_loss"]
    assert record["task/pocket-memorization/loss"] == pytest.approx(
        record["member/0/pocket-memorization/loss"], rel=1e-5)


def test_merge_without_snapshots_says_how_to_get_them(tmp_path, capsys):
    RunDir(tmp_path / "run").write_config(tiny_config())
    assert main(["merge", str(tmp_path / "run"), "--window", "10", "--out",
                 str(tmp_path / "m")]) == 2
    assert "train.save_every" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_damaged_snapshot_is_an_error_naming_the_file(constant_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(constant_run / "run", run)
    _, last = RunDir(run).list_snapshots()[-1]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    assert main(["merge", str(run), "--window", "8", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "checksum mismatch" in err

"""[log] tracker: a missing package is one error line; TensorBoard gets the metrics rows."""

from __future__ import annotations

import pytest

from helpers import tiny_config
from moe.app.cli import main as moe_main
from moe.config import ConfigError, LogConfig, config_hash
from moe.rundir import RunDir
from moe.train import train_run
from moe.train.tracking import scalars, sweep_group


def test_log_section_is_not_part_of_the_run_id():
    assert config_hash(tiny_config()) == config_hash(tiny_config("log.tracker=tensorboard"))
    with pytest.raises(ConfigError, match="log.tracker"):
        LogConfig(tracker="mlflow")


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_missing_tracker_package_is_a_one_line_error(tmp_path, monkeypatch, capsys, tracker):
    import builtins

    real_import = builtins.__import__

    def no_tracker(name, *args, **kw):
        if name.split(".")[0] == tracker:
            raise ImportError(f"No module named {tracker!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tracker)
    cfg = tiny_config(f"log.tracker={tracker}")
    with pytest.raises(ValueError, match=f"pip install {tracker}$"):
        train_run(cfg, tmp_path / "run")
    assert not RunDir(tmp_path / "run").list_checkpoints()  # failed before training
    config = tmp_path / "c.toml"
    config.write_text(cfg.to_toml())
    assert moe_main(["train", str(config), "--out", str(tmp_path / "run2"), "--quiet"]) == 69
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {tracker}" in err


def test_tensorboard_events_hold_the_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    train_run(tiny_config("log.tracker=tensorboard", "train.tokens=4096"), run.path)
    events = EventAccumulator(str(run.tensorboard_dir))
    events.Reload()
    rows = [r for r in run.read_metrics() if "loss" in r]
    assert len(rows) >= 3
    for name in ("loss", "ce", "lr", "grad_norm", "tokens", "max_over_mean_load/1"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        want = [(r["step"], scalars(r)[name]) for r in rows]
        assert [s for s, _ in logged] == [s for s, _ in want]
        assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=1e-6)


def test_sweep_runs_are_grouped_by_the_sweep_name(tmp_path):
    sweep = tmp_path / "sw"
    (sweep / "runs" / "abc").mkdir(parents=True)
    (sweep / "sweep.toml").write_text('name = "pocket-science"\n')
    assert sweep_group(RunDir(sweep / "runs" / "abc"), LogConfig()) == "pocket-science"
    assert sweep_group(RunDir(tmp_path / "solo"), LogConfig()) is None
    assert sweep_group(RunDir(tmp_path / "solo"), LogConfig(group="g")) == "g"
    row = {"step": 5, "time": 1.0, "loss": 2.0, "max_over_mean_load": [1.5, 2.0],
           "eval": {"t": {"loss": 3.0, "kind": "reasoning", "accuracy": None}}}
    assert scalars(row) == {"loss": 2.0, "max_over_mean_load/0": 1.5,
                            "max_over_mean_load/1": 2.0, "task/t/loss": 3.0}


def test_trackio_gets_the_metrics_rows(tmp_path, monkeypatch):
    import json
    import sqlite3
    import sys

    if "trackio" in sys.modules:
        pytest.skip("trackio reads TRACKIO_DIR on import; it was imported already")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read on import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("trackio")
    run = RunDir(tmp_path / "sweep" / "runs" / "abc")
    (tmp_path / "sweep" / "sweep.toml").parent.mkdir(parents=True)
    (tmp_path / "sweep" / "sweep.toml").write_text('name = "tiny-sweep"\n')
    train_run(tiny_config("log.tracker=trackio", "train.tokens=2048"), run.path)
    db = sqlite3.connect(tmp_path / "trackio" / "moe-sparsity.db")
    cur = db.execute("select * from metrics")
    cols = [d[0] for d in cur.description]
    logged = {r[cols.index("step")]: json.loads(r[cols.index("metrics")]) for r in cur}
    rows = [r for r in run.read_metrics() if "loss" in r]
    assert sorted(logged) == [r["step"] for r in rows]
    for r in rows:
        assert logged[r["step"]]["loss"] == pytest.approx(r["loss"])


def test_wandb_offline_run_lives_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path / "run")
    train_run(tiny_config("log.tracker=wandb", "train.tokens=2048"), run.path)
    assert list((run.path / "wandb").glob("offline-run-*"))

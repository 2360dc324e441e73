"""`moe.config.limits`: every config value is bounded, and a run outside the bounds is refused
with one line before anything is allocated or written."""

from __future__ import annotations

import pytest

from helpers import tiny_config
from moe.app.cli import main
from moe.config import ConfigError, apply_overrides
from moe.config.limits import LIMITS

ABSURD = ["model.n_layers=100000000000000000000",  # used to hang in the allocator
          "train.batch_size=1000000000",             # used to allocate > 6 GB, then fail
          "train.num_threads=5000",                  # used to segfault
          "model.d_model=1048576",                   # used to leave a blocking config.toml
          "train.batch_size=1048576"]                # within the caps, far above any RAM


@pytest.mark.parametrize("override", ABSURD)
def test_absurd_runs_are_refused_in_one_line_before_anything_is_written(override, tmp_path,
                                                                         capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(tiny_config().to_toml())
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--quiet", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()










@pytest.mark.parametrize("key", [f"{s}.{k}" for s, caps in LIMITS.items() for k in caps])
def test_every_capped_value_is_refused_above_its_cap(key):
    section, name = key.split(".")
    cap = LIMITS[section][name]
    value = int(cap) + 1 if float(cap).is_integer() else cap * 2
    with pytest.raises(ConfigError):
        apply_overrides(tiny_config(), [f"{key}={value}"])


def test_paper_configs_are_within_the_caps():
    from pathlib import Path

    from moe.config import load_config

    paths = sorted(Path(__file__).resolve().parent.parent.glob("configs/**/*.toml"))
    assert paths
    for path in paths:
        load_config(path)



"""The main job: `moe demo` (what `make demo` runs) on the real pocket sweep, end to end.

This is the slowest test (a few minutes on 2 cores): it is the README's promise to a
new user, so CI keeps it honest.
"""

import json

import pandas as pd
import pytest

from moe.app.cli import main


@pytest.mark.slow
def test_demo_end_to_end_then_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--dir", str(out), "--quiet"]) == 0
    first = capsys.readouterr().out
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) >= 12
    assert set(table["n_experts"]) >= {1, 4, 16}
    assert table[["train_loss", "val_loss", "task/pocket-memorization/loss",
                  "task/pocket-reasoning/loss"]].notna().all().all()
    assert (out / "report.md").is_file()
    assert len(list((out / "figures").glob("*.png"))) >= 4
    assert "[4/4]" in first
    found = json.loads((out / "findings.json").read_text())
    assert [f["id"] for f in found] == ["memorization_follows_pretraining_loss",
                                        "reasoning_fans_out_at_equal_loss",
                                        "reasoning_optimum_denser_than_loss_optimum",
                                        "topk_helps_reasoning_at_equal_loss"]
    assert all(f["resolved"] or f["agrees_with_paper"] is None for f in found)
    assert (out / "report.md").read_text().split("\n## ")[1].startswith(
        "The paper's findings at this scale")
    # a second demo reuses every finished run
    assert main(["demo", "--dir", str(out), "--quiet"]) == 0
    assert f"reused {len(table)} finished run(s)" in capsys.readouterr().out

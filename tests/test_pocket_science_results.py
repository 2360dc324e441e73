"""The committed pocket-science study (benchmarks/results/pocket-science/): its findings.json
is what the analysis computes from its committed results table, so a change to the
analysis that would change the published verdicts shows up here."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "pocket-science"


def test_committed_findings_are_what_the_committed_table_gives():
    from moe.analysis.findings import compute_findings

    table = pd.read_parquet(RESULTS / "results.parquet")
    assert len(table) == 252 and set(table["train.seed"]) == {0, 1}
    want = json.loads((RESULTS / "findings.json").read_text())
    got = [f.to_dict() for f in compute_findings(table, n_boot=200, seed=0)]  # `moe report`
    assert [f["id"] for f in got] == [f["id"] for f in want]
    for g, w in zip(got, want, strict=True):
        assert (g["resolved"], g["agrees_with_paper"], g["n_runs"]) == (
            w["resolved"], w["agrees_with_paper"], w["n_runs"]), g["id"]
        for key in ("estimate", "ci_low", "ci_high"):
            assert g[key] == pytest.approx(w[key], rel=1e-9), (g["id"], key)

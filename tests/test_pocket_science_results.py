"""The committed pocket-science study (benchmarks/results/pocket-science/): its findings.json
and the descriptive optima in report.json are what the analysis computes from its committed
results table, and its README states those verdicts, so a change to the analysis that would
change the published verdicts shows up here."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "pocket-science"
PUBLISHED = {  # what README.md and the study's README say
    "memorization_follows_pretraining_loss": "found",
    "reasoning_fans_out_at_equal_loss": "not resolved at this scale",
    "reasoning_optimum_denser_than_loss_optimum": "not resolved at this scale",
    "topk_helps_reasoning_at_equal_loss": "found the opposite",
}


def test_committed_findings_are_what_the_committed_table_gives():
    from moe.analysis.findings import findings_and_optima

    table = pd.read_parquet(RESULTS / "results.parquet")
    assert len(table) == 252 and set(table["train.seed"]) == {0, 1}
    want = json.loads((RESULTS / "findings.json").read_text())
    found, optima = findings_and_optima(table, n_boot=200, seed=0)  # `moe report`'s defaults
    got = [f.to_dict() for f in found]
    assert {g["id"]: g["verdict"] for g in got} == PUBLISHED
    assert [f["id"] for f in got] == [f["id"] for f in want]
    for g, w in zip(got, want, strict=True):
        assert (g["resolved"], g["agrees_with_paper"], g["n_runs"], g["verdict"]) == (
            w["resolved"], w["agrees_with_paper"], w["n_runs"], w["verdict"]), g["id"]
        for key in ("estimate", "ci_low", "ci_high"):
            assert g[key] == pytest.approx(w[key], rel=1e-9), (g["id"], key)
        assert g["ci_low"] <= g["estimate"] <= g["ci_high"]
    recorded = json.loads((RESULTS / "report.json").read_text())["sparsity_optima"]
    for r, o in zip(recorded, optima, strict=True):
        assert (r["quantity"], r["where"]) == (o.quantity, o.where)
        for key in ("estimate", "ci_low", "ci_high"):
            assert r[key] == pytest.approx(getattr(o, key), rel=1e-9), (o.quantity, key)


def test_committed_study_has_the_dissociation_figure_and_states_what_it_reproduces():
    assert (RESULTS / "figures" / "fig8_dissociation.png").is_file()
    readme = (RESULTS / "README.md").read_text()
    report = (RESULTS / "report.md").read_text()
    for fid, verdict in PUBLISHED.items():
        assert f"| {fid} | **{verdict}** |" in report
        assert f"`{fid}`: {verdict}" in readme

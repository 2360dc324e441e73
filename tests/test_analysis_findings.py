"""The paper's findings on synthetic tables where each effect is built in, reversed or
absent: resolved-and-agrees, resolved-and-disagrees, not resolved; and findings.json."""

import json

import numpy as np
import pytest

from moe.analysis import findings, synthetic
from moe.analysis.report import make_report

IDS = ["memorization_follows_pretraining_loss", "reasoning_optimal_sparsity",
       "topk_helps_reasoning_at_equal_loss"]


def verdicts(df, n_boot=200):
    return {f.id: f for f in findings.compute_findings(df, n_boot=n_boot, seed=0)}


def test_each_effect_built_in_is_found():
    found = verdicts(synthetic.findings_table(seed=1))
    assert list(found) == IDS
    for f in found.values():
        assert f.resolved and f.agrees_with_paper is True and f.verdict == "found", f
        assert f.ci_low <= f.estimate <= f.ci_high
    s_lo, s_hi = found["reasoning_optimal_sparsity"].null_at
    assert s_lo < found["reasoning_optimal_sparsity"].ci_low
    assert found["reasoning_optimal_sparsity"].ci_high < s_hi


def test_each_effect_reversed_is_found_the_opposite():
    df = synthetic.findings_table(seed=2, memo_sparsity=1.0, reasoning_u=0.0,
                                  reasoning_trend=-0.05, topk=0.05)
    for f in verdicts(df).values():
        assert f.resolved and f.agrees_with_paper is False, f
        assert f.verdict == "found the opposite"


def test_each_effect_absent_under_noise_is_not_resolved():
    df = synthetic.findings_table(seed=3, memo_sparsity=0.3, reasoning_u=0.0, topk=0.0,
                                  noise=0.3)
    for f in verdicts(df).values():
        assert not f.resolved and f.agrees_with_paper is None, f
        assert f.verdict == "not resolved at this scale" and f.reason


def test_statistics_match_their_closed_forms_on_noiseless_tables():
    df = synthetic.findings_table(memo_sparsity=0.2, reasoning_u=0.0, topk=-0.07, noise=0.0,
                                  pretrain_noise=0.0)
    rows = findings.run_table(df)
    pre, s = rows["pretrain_loss"], rows["sparsity"]
    move_s, move_p = 0.2 * np.ptp(s), 1.3 * np.ptp(pre)  # memorization = 0.4 + 1.3 L + 0.2 s
    assert findings.memo_share(rows) == pytest.approx(move_s / (move_s + move_p), rel=1e-6)
    flipped = rows.assign(memorization=3.0 - rows["memorization"])  # falls as loss rises
    assert findings.memo_share(flipped) == 1.0
    moe_rows = rows[rows["n_experts"] > 1]
    assert findings.topk_slope(moe_rows) == pytest.approx(-0.07, abs=1e-9)


def test_reasoning_optimum_matches_a_grid_search():
    """The constrained minimiser of the pooled quadratic equals a dense grid's argmin."""
    df = synthetic.findings_table(seed=4, noise=0.02)
    rows = findings.run_table(df).dropna(subset=["reasoning"])
    rows = rows.assign(group=rows["d_model"].astype(str) + "-" + rows["top_k"].astype(str))
    x = findings.log_ratio(rows["sparsity"])
    groups = np.column_stack([(rows["group"] == g).to_numpy(float)
                              for g in sorted(rows["group"].unique())])
    coef = np.linalg.lstsq(np.column_stack([groups, x, x * x]), rows["reasoning"],
                           rcond=None)[0]
    grid = np.linspace(x.min(), x.max(), 200_001)
    best = grid[np.argmin(coef[-2] * grid + coef[-1] * grid ** 2)]
    assert findings.reasoning_optimum(rows) == pytest.approx(best, abs=1e-4)


def test_too_few_runs_or_columns_are_not_resolved_with_a_reason():
    df = synthetic.findings_table(widths=(32,), experts=(1, 4), top_ks=(1,))
    for f in verdicts(df, n_boot=10).values():
        assert not f.resolved and f.estimate is None and "need" in f.reason
    with pytest.raises(ValueError, match="n_boot"):
        findings.compute_findings(df, n_boot=1)


def test_bootstrap_is_seeded():
    df = synthetic.findings_table(seed=5, noise=0.05)
    a = findings.compute_findings(df, n_boot=50, seed=7)
    b = findings.compute_findings(df, n_boot=50, seed=7)
    c = findings.compute_findings(df, n_boot=50, seed=8)
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert [f.ci_high for f in a] != [f.ci_high for f in c]


def test_report_writes_findings_json_and_lists_them_first(tmp_path):
    make_report(synthetic.findings_table(seed=1), tmp_path / "report.md", n_boot=50)
    records = json.loads((tmp_path / "findings.json").read_text())
    assert [r["id"] for r in records] == IDS
    keys = {"id", "statement", "null", "estimate", "ci_low", "ci_high", "resolved",
            "agrees_with_paper", "n_runs", "reason"}
    assert all(keys <= set(r) for r in records)
    text = (tmp_path / "report.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## The paper's findings at this scale"
    assert text.count("**found**") == 3
    assert (tmp_path / "figures" / "fig7_findings.png").is_file()


def test_topk_is_compared_at_matched_total_parameters_not_across_widths():
    """k > 1 only at width 32, and width 64 reasons better at equal pre-training loss: a
    pooled comparison would call that a top-k effect; matched-total cells do not."""
    df = synthetic.findings_table(seed=6, topk=0.0, reasoning_u=0.0, widths=(32, 64),
                                  noise=0.002)
    df = df[(df["top_k"] == 1) | (df["d_model"] == 32)].copy()
    df.loc[df["d_model"] == 64, "task/arith/loss"] -= 0.2
    cells = findings.matched_total_cells(findings.run_table(df))
    assert set(cells["d_model"]) == {32}
    f = verdicts(df)["topk_helps_reasoning_at_equal_loss"]
    assert not f.resolved and f.ci_low < 0 < f.ci_high

"""The paper's findings on synthetic tables where each effect is built in, reversed or
absent, and on the confound (reasoning a pure function of a loss whose own optimum in
sparsity is interior): found, found the opposite, not resolved, not testable; the fast
statistics against plain loops; BCa against scipy; findings.json and --findings-only."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe.analysis import findings, synthetic
from moe.analysis import findings_stats as fs
from moe.analysis.report import make_report
from moe.analysis.resample import bca, count_weights, wls
from moe.app.cli import main

IDS = ["memorization_follows_pretraining_loss", "reasoning_fans_out_at_equal_loss",
       "reasoning_optimum_denser_than_loss_optimum", "topk_helps_reasoning_at_equal_loss"]
POCKET = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "pocket-science"
# reasoning = h(pre-training loss) exactly (h curved), and the loss has an interior optimum
CONFOUND = dict(reasoning_u=0.0, reasoning_trend=0.0, reasoning_curve=2.0, loss_u=0.05,
                topk=0.0, seeds=2)
REVERSED = dict(memo_sparsity=1.0, reasoning_u=0.05, reasoning_at=3.5, loss_u=0.02,
                loss_at=1.0, reasoning_trend=-0.05, topk=0.05)


def verdicts(df, n_boot=1000):
    return {f.id: f for f in findings.compute_findings(df, n_boot=n_boot, seed=0)}


def test_each_effect_built_in_is_found():
    found = verdicts(synthetic.findings_table(seed=1, seeds=2))
    assert list(found) == IDS
    for f in found.values():
        assert f.resolved and f.agrees_with_paper is True and f.verdict == "found", f
        assert f.ci_low <= f.estimate <= f.ci_high and f.n_boot == 1000
        assert all(p.holds for p in f.preconditions) and len(f.preconditions) == 2


def test_each_effect_reversed_is_found_the_opposite():
    for f in verdicts(synthetic.findings_table(seed=2, **REVERSED)).values():
        assert f.resolved and f.agrees_with_paper is False, f
        assert f.verdict == "found the opposite"


def test_each_effect_absent_under_noise_is_not_resolved():
    df = synthetic.findings_table(seed=3, memo_sparsity=0.3, reasoning_u=0.0,
                                  reasoning_trend=0.0, topk=0.0, noise=0.3)
    got = verdicts(df)
    # no dissociation here: reasoning's minimum is pure noise, pulled inwards from the loss
    # minimum at the sparse edge, so the raw gap lies below 0; the permutations say so
    assert got[findings.GAP.id].ci_high < 0
    assert "noise alone can make it" in got[findings.GAP.id].reason
    for f in got.values():
        assert not f.resolved and f.agrees_with_paper is None, f
        assert f.verdict == "not resolved at this scale" and f.reason


def _old_reasoning_optimal_sparsity(df, n_boot=200):
    """The statistic findings.json had before (a faithful copy): one quadratic in x =
    log2(E/k) with an intercept per fixed-active-parameter group; "found" when the
    percentile interval of its minimiser lies inside the sampled range."""
    rows = findings.run_table(df).dropna(subset=["sparsity", "reasoning"])
    rows = rows.assign(group=findings.active_groups(rows))
    rows = rows[rows.groupby("group")["sparsity"].transform("nunique") >= 3]
    x_all = -np.log2(1 - rows["sparsity"].to_numpy(float))
    lo_x, hi_x = x_all.min(), x_all.max()

    def optimum(r):
        x = -np.log2(1 - r["sparsity"].to_numpy(float))
        design = np.column_stack([pd.get_dummies(r["group"]).to_numpy(float), x, x * x])
        if np.linalg.matrix_rank(design) < design.shape[1]:
            return np.inf
        c1, c2 = np.linalg.lstsq(design, r["reasoning"].to_numpy(float), rcond=None)[0][-2:]
        cand = [lo_x, hi_x] + ([-c1 / (2 * c2)] if c2 > 0 and lo_x < -c1 / (2 * c2) < hi_x
                               else [])
        return min(cand, key=lambda v: c1 * v + c2 * v * v)
    boot = [optimum(rows.iloc[np.random.default_rng([0, i]).integers(0, len(rows), len(rows))])
            for i in range(n_boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return "found" if lo_x < lo and hi < hi_x else "not found"


def test_confound_is_found_by_the_old_statistic_and_not_by_the_new_findings():
    """Reasoning is a pure function of pre-training loss, whose own optimum in sparsity is
    interior: "reasoning has an interior optimum" holds, but it says nothing about reasoning
    beyond the loss. The dissociation findings must not be found."""
    df = synthetic.findings_table(seed=4, **CONFOUND)
    assert _old_reasoning_optimal_sparsity(df) == "found"
    got = verdicts(df)
    for fid in (findings.FANOUT.id, findings.GAP.id):
        assert got[fid].verdict == "not resolved at this scale", got[fid]
    assert got[findings.GAP.id].estimate == 0.0  # the observed minima coincide
    optima = {o.quantity: o for o in findings.sparsity_optima(df, n_boot=1000)}
    assert optima["pre-training loss"].where == optima["reasoning"].where == "interior"
    assert optima["reasoning"].estimate == pytest.approx(optima["pre-training loss"].estimate,
                                                         abs=0.05)


def test_topk_at_equal_loss_is_not_fooled_by_a_curved_reasoning_of_loss():
    """On the confound, k moves the loss and reasoning is a curved function of the loss:
    the old statistic (a straight line in pre-training loss, a faithful copy here) calls
    the curvature a top-k effect; the spline in the loss does not."""
    df = synthetic.findings_table(seed=4, **CONFOUND)
    rows = findings.matched_total_cells(findings.run_table(df))
    design = np.column_stack([np.ones(len(rows)), rows["pretrain_loss"],
                              np.log2(rows["top_k"])])

    def old_slope(idx):
        return np.linalg.lstsq(design[idx], rows["reasoning"].to_numpy()[idx], rcond=None)[0][2]
    boot = [old_slope(np.random.default_rng([0, i]).integers(0, len(rows), len(rows)))
            for i in range(200)]
    assert np.percentile(boot, 2.5) > 0  # old: "found the opposite"
    assert verdicts(df)[findings.TOPK.id].verdict == "not resolved at this scale"


def test_confound_with_noise_is_not_found_either():
    for seed in (5, 6):
        got = verdicts(synthetic.findings_table(seed=seed, **{**CONFOUND, "noise": 0.05}))
        for fid in (findings.FANOUT.id, findings.GAP.id):
            assert got[fid].agrees_with_paper is not True, got[fid]


def test_a_failing_precondition_is_not_testable_and_says_which():
    # one width and one k: sparsity alone sets the loss, and there is one group
    one = verdicts(synthetic.findings_table(seed=7, widths=(32,), top_ks=(1,), seeds=2))
    fan, gap = one[findings.FANOUT.id], one[findings.GAP.id]
    assert fan.verdict == ("not testable at this scale: sparsity varies at equal "
                           "pre-training loss")
    assert gap.verdict.startswith("not testable at this scale: fixed-active-parameter groups")
    assert not fan.resolved and fan.estimate is None and not fan.testable
    # a loss that sparsity does not move: no loss optimum to compare with
    df = synthetic.findings_table(seed=8, seeds=2)
    rng = np.random.default_rng(0)
    df["val_loss"] = 2.0 - 0.004 * df["d_model"] + rng.normal(0, 0.01, len(df))
    gap = verdicts(df)[findings.GAP.id]
    assert gap.verdict == ("not testable at this scale: sparsity moves pre-training loss at "
                           "fixed active parameters")
    assert "F-test p = " in gap.reason
    with pytest.raises(ValueError, match="failing precondition"):
        findings.Finding(id="x", statement="", null="", estimate=1.0, ci_low=0.0, ci_high=2.0,
                         resolved=True, agrees_with_paper=True, n_runs=9, reason="",
                         preconditions=(findings.Precondition(what="w", holds=False,
                                                              detail=""),))


def test_too_few_runs_are_not_testable_with_a_reason():
    df = synthetic.findings_table(widths=(32,), experts=(1, 4), top_ks=(1,))
    for f in verdicts(df, n_boot=10).values():
        assert not f.resolved and f.estimate is None and "need" in f.reason
        assert f.verdict.startswith("not testable at this scale: ")
    with pytest.raises(ValueError, match="n_boot"):
        findings.compute_findings(df, n_boot=1)


def _interval_tables():
    pocket = pd.read_parquet(POCKET / "results.parquet")
    yield pocket[pocket["train.seed"] == 0]  # its memorization estimate left its interval
    yield synthetic.findings_table(seed=1)
    yield synthetic.findings_table(seed=2, **REVERSED)
    yield synthetic.findings_table(seed=3, memo_sparsity=0.3, reasoning_u=0.0, topk=0.0,
                                   noise=0.3)
    yield synthetic.findings_table(seed=4, **CONFOUND)


def test_no_interval_excludes_its_own_estimate():
    for df in _interval_tables():
        found, optima = findings.findings_and_optima(df, n_boot=1000)
        for f in [*found, *optima]:
            if f.ci_low is not None:
                assert f.ci_low <= f.estimate <= f.ci_high, f
    memo = findings.compute_findings(next(_interval_tables()))[0]
    assert memo.estimate == pytest.approx(0.00305, abs=5e-5)  # the case the old one missed
    assert memo.ci_low < memo.estimate < memo.ci_high


def test_bca_matches_scipy_on_a_skewed_mean():
    """scipy.stats.bootstrap's BCa (an independent implementation) on the mean of 40
    exponential draws: the same interval up to Monte Carlo error."""
    from scipy.stats import bootstrap
    y = np.random.default_rng(1).exponential(size=40)
    ref = bootstrap((y,), np.mean, n_resamples=20000, method="BCa", random_state=2)
    iv = bca(lambda w: (w @ y) / w.sum(axis=1), 40, count_weights(np.zeros(40), 20000, 3))
    assert iv.estimate == pytest.approx(y.mean())
    assert iv.low == pytest.approx(ref.confidence_interval.low, rel=0.02)
    assert iv.high == pytest.approx(ref.confidence_interval.high, rel=0.02)
    assert iv.high - y.mean() > y.mean() - iv.low  # skewed right, as BCa should be


def test_a_lopsided_bootstrap_gives_no_interval_not_one_without_its_estimate():
    y = np.r_[np.zeros(30), 1.0]  # max: 0 in ~37% of resamples, the estimate 1 in the rest
    iv = bca(lambda w: np.where(w[:, -1] > 0, 1.0, 0.0), 31, count_weights(np.zeros(31), 500, 0))
    assert iv.estimate == 1.0 == y.max()
    assert (iv.low is None) or iv.low <= 1.0 <= iv.high


def test_weighted_fits_equal_plain_fits_on_the_resampled_rows():
    """Count weights are a resample: each statistic at weights w equals the statistic
    computed by plain loops on the rows repeated w times."""
    df = synthetic.findings_table(seed=9, noise=0.02, seeds=2)
    rows = findings.optimum_rows(findings.run_table(df))
    w_BN = count_weights(rows["group"].to_numpy(str), 3, 0)
    for w_N in [np.ones(len(rows)), *w_BN]:
        picked = rows.iloc[np.repeat(np.arange(len(rows)), w_N.astype(int))]
        x_NP = np.column_stack([np.ones(len(picked)), picked["pretrain_loss"]])
        ref = np.linalg.lstsq(x_NP, picked["reasoning"], rcond=None)[0]
        x_all = np.column_stack([np.ones(len(rows)), rows["pretrain_loss"]])
        assert wls(x_all, rows["reasoning"].to_numpy(), w_N[None])[0] == pytest.approx(ref)
        assert fs.optimum_gap_stat(rows)(w_N[None])[0] == pytest.approx(_gap_by_loops(picked))
        in_groups = np.ones(len(rows), bool)
        assert fs.fanout_stat(rows, in_groups)(w_N[None])[0] == pytest.approx(
            _fanout_by_loops(picked, fs.loss_curve_basis(rows["pretrain_loss"].to_numpy()),
                             np.repeat(np.arange(len(rows)), w_N.astype(int))), rel=1e-8)


def _gap_by_loops(rows):
    gaps = []
    for _, part in rows.groupby("group"):
        means = part.groupby("sparsity")[["reasoning", "pretrain_loss"]].mean()
        to_x = -np.log2(1 - means.index.to_numpy())
        gaps.append(to_x[means["reasoning"].argmin()] - to_x[means["pretrain_loss"].argmin()])
    return np.mean(gaps)


def _fanout_by_loops(rows, basis_full, take):
    basis = basis_full[take]
    y = rows["reasoning"].to_numpy()
    resid = y - basis @ np.linalg.lstsq(basis, y, rcond=None)[0]
    num = den = 0.0
    for g in rows["group"].unique():
        m = (rows["group"] == g).to_numpy()
        x = -np.log2(1 - rows["sparsity"].to_numpy()[m])
        num += np.sum((x - x.mean()) * (resid[m] - resid[m].mean()))
        den += np.sum((x - x.mean()) ** 2)
    return num / den


def test_statistics_match_their_closed_forms_on_noiseless_tables():
    df = synthetic.findings_table(memo_sparsity=0.2, reasoning_u=0.0, reasoning_trend=0.0,
                                  topk=-0.07, noise=0.0, pretrain_noise=0.0)
    rows = findings.run_table(df)
    pre, s = rows["pretrain_loss"], rows["sparsity"]
    move_s, move_p = 0.2 * np.ptp(s), 1.3 * np.ptp(pre)  # memorization = 0.4 + 1.3 L + 0.2 s
    assert findings.memo_share(rows) == pytest.approx(move_s / (move_s + move_p), rel=1e-6)
    assert findings.memo_share(rows.assign(memorization=-rows["memorization"])) == -1.0
    assert findings.topk_slope(rows[rows["n_experts"] > 1]) == pytest.approx(-0.07, abs=1e-9)


def test_the_descriptive_optimum_matches_a_grid_search():
    """The constrained minimiser of the pooled quadratic equals a dense grid's argmin."""
    rows = findings.optimum_rows(findings.run_table(synthetic.findings_table(seed=4,
                                                                             noise=0.02)))
    x = fs.log_ratio(rows["sparsity"])
    groups = pd.get_dummies(rows["group"]).to_numpy(float)
    coef = np.linalg.lstsq(np.column_stack([groups, x, x * x]), rows["reasoning"],
                           rcond=None)[0]
    grid = np.linspace(x.min(), x.max(), 200_001)
    best = grid[np.argmin(coef[-2] * grid + coef[-1] * grid ** 2)]
    got = fs.pooled_optimum_stat(rows, "reasoning")(np.ones((1, len(rows))))[0]
    assert got == pytest.approx(best, abs=1e-4)


def test_bootstrap_is_seeded():
    df = synthetic.findings_table(seed=5, noise=0.05)
    a = findings.compute_findings(df, n_boot=200, seed=7)
    b = findings.compute_findings(df, n_boot=200, seed=7)
    c = findings.compute_findings(df, n_boot=200, seed=8)
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert [f.ci_high for f in a] != [f.ci_high for f in c]


def test_findings_on_the_pocket_science_table_take_under_5_cpu_seconds():
    table = pd.read_parquet(POCKET / "results.parquet")
    findings.findings_and_optima(table.head(60), n_boot=1000)  # warm numpy's code paths
    start = time.process_time()
    findings.findings_and_optima(table, n_boot=1000)
    assert time.process_time() - start < 5.0


def _without_timings(x):
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k not in ("seconds", "n_workers")}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


def test_report_writes_findings_json_and_lists_them_first_forked_or_not(tmp_path, monkeypatch):
    """The report's findings.json and sections. `make_report` draws half the figures and
    compares the laws in forked processes; with one usable core it makes everything itself.
    Both reports must be the same, byte for byte (timings aside), and the forks must have
    happened."""
    from moe.analysis import report

    forks = []

    class Counted(report.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            forks.append(fn.__name__)
            return super().submit(fn, *args, **kwargs)

    table = synthetic.findings_table(seed=1, seeds=2)
    monkeypatch.setattr(report, "ProcessPoolExecutor", Counted)
    monkeypatch.setattr(report, "affinity_cores", lambda: 2)
    make_report(table, tmp_path / "forked" / "report.md", n_boot=50)
    assert sorted(forks) == ["_which_law_part", "save_figures"]
    monkeypatch.setattr(report, "affinity_cores", lambda: 1)
    make_report(table, tmp_path / "inline" / "report.md", n_boot=50)
    assert len(forks) == 2
    forked, inline = tmp_path / "forked", tmp_path / "inline"
    assert (forked / "report.md").read_text() == (inline / "report.md").read_text()
    assert (forked / "findings.json").read_text() == (inline / "findings.json").read_text()
    assert _without_timings(json.loads((forked / "report.json").read_text())) == \
        _without_timings(json.loads((inline / "report.json").read_text()))
    pngs = sorted(p.name for p in (inline / "figures").glob("*.png"))
    assert len(pngs) >= 4
    assert sorted(p.name for p in (forked / "figures").glob("*.png")) == pngs
    for name in pngs:
        assert (forked / "figures" / name).read_bytes() == (inline / "figures" / name).read_bytes()

    records = json.loads((forked / "findings.json").read_text())
    assert [r["id"] for r in records] == IDS
    keys = {"id", "statement", "null", "estimate", "ci_low", "ci_high", "resolved",
            "agrees_with_paper", "n_runs", "reason", "preconditions", "verdict", "testable"}
    assert all(keys <= set(r) for r in records)
    assert all(r["n_boot"] == findings.MIN_BOOT for r in records)
    text = (forked / "report.md").read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## The paper's findings at this scale"
    assert text.count("**found**") == 4
    assert "| reasoning | 0.85" in text  # the descriptive optima, beside each other
    assert (forked / "figures" / "fig7_findings.png").is_file()
    assert (forked / "figures" / "fig8_dissociation.png").is_file()


def test_a_failure_in_a_forked_report_part_reaches_the_caller():
    from moe.analysis.report import beside

    wait = beside(int, "not a number")
    with pytest.raises(ValueError, match="not a number"):
        wait()


def test_findings_only_prints_and_writes_just_the_findings(tmp_path, capsys):
    table = tmp_path / "t.csv"
    synthetic.findings_table(seed=1, seeds=2).to_csv(table, index=False)
    out = tmp_path / "f.json"
    assert main(["report", str(table), "--findings-only", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("## The paper's findings at this scale")
    assert [r["verdict"] for r in json.loads(out.read_text())] == ["found"] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "t.csv"]
    assert main(["report", str(table), "--findings-only", "-o", str(tmp_path / "r.md")]) == 2
    assert "FILE.json" in capsys.readouterr().err
    bare = tmp_path / "bare.csv"
    pd.read_csv(table).drop(columns=["task/arith/loss", "task/arith/kind"]).to_csv(bare)
    assert main(["report", str(bare), "--findings-only"]) == 2
    assert "a reasoning task loss" in capsys.readouterr().err


def test_topk_is_compared_at_matched_total_parameters_not_across_widths():
    """k > 1 only at width 32, and width 64 reasons better at equal pre-training loss: a
    pooled comparison would call that a top-k effect; matched-total cells do not."""
    df = synthetic.findings_table(seed=6, topk=0.0, reasoning_u=0.0, reasoning_trend=0.0,
                                  widths=(32, 64),
                                  noise=0.002)
    df = df[(df["top_k"] == 1) | (df["d_model"] == 32)].copy()
    df.loc[df["d_model"] == 64, "task/arith/loss"] -= 0.2
    cells = findings.matched_total_cells(findings.run_table(df))
    assert set(cells["d_model"]) == {32}
    f = verdicts(df)["topk_helps_reasoning_at_equal_loss"]
    assert not f.resolved and f.ci_low < 0 < f.ci_high

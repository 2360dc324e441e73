"""Identifiability of every fitted object, Approach 2 from interior budgets only, one compute
definition for MoE tables, prediction and leave-out, any table, column errors, no torch."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from moe.analysis import TableError, fit, isoflop, laws, synthetic
from moe.analysis.bootstrap import bootstrap_fit
from moe.analysis.predict import predict_from_record
from moe.analysis.report import make_report
from moe.app import analysis_cmd

matplotlib.use("Agg")
TRUTH = {"E": 1.8, "A": 450.0, "B": 2000.0, "alpha": 0.34, "beta": 0.37}
A_TRUE = laws.compute_optimal_exponents(TRUTH["alpha"], TRUTH["beta"])[0]
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="moe")
    analysis_cmd.register(parser.add_subparsers())
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def one_line(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg


# --- Approach 3 -------------------------------------------------------------------------

def test_well_designed_table_is_identified_and_recovered_inside_intervals():
    data = fit.prepare(synthetic.chinchilla_table(TRUTH, seed=3, noise=0.01))
    point = fit.fit_data(data)
    boot = bootstrap_fit(point, data, n_resamples=60, seed=3, n_workers=1, level=0.99)
    result = fit.with_bootstrap(point, data, boot)
    assert result.verdict.identified, result.verdict.warnings
    record = result.to_dict()
    assert record["identified"] is True and record["warnings"] == []
    for name, value in TRUTH.items():
        lo, hi = boot.intervals[name]
        assert lo <= value <= hi, (name, value, lo, hi)


@pytest.mark.parametrize("n_values, reason", [
    ((1e8,), "N (n_params_total) takes 1 distinct value(s); need at least 3"),
    ((1e8, 1.3e8, 1.6e8, 2e8), "spans only a factor of 2 (less than a decade)"),
])
def test_poorly_designed_tables_are_not_identified_with_the_reason(n_values, reason):
    result = fit.fit_data(fit.prepare(synthetic.chinchilla_table(TRUTH, n_values=n_values)))
    assert not result.verdict.identified
    assert any(reason in r for r in result.verdict.reasons), result.verdict.reasons
    record = result.to_dict()
    assert record["identified"] is False and any(reason in w for w in record["warnings"])


def test_fixed_tpp_and_single_budget_are_not_identified():
    pocket = fit.fit_data(fit.prepare(synthetic.pocket_table()))
    assert not pocket.verdict.identified
    assert any("fixed tokens per parameter" in r for r in pocket.verdict.reasons)
    for seed in (0, 2):
        table = synthetic.isoflop_table(TRUTH, budgets=(1e18,), seed=seed)
        single = fit.fit_data(fit.prepare(table))
        assert not single.verdict.identified
        assert any("a single compute budget" in r for r in single.verdict.reasons)


def test_exponent_outside_range_and_e_above_lowest_loss_are_flagged():
    data = fit.prepare(synthetic.chinchilla_table(TRUTH))
    base = fit.fit_data(data)
    bad = fit.LawFit(**{**base.__dict__, "params": {**base.params, "alpha": 2.5,
                                                    "E": float(data.loss.min()) + 0.1}})
    reasons = " ".join(i.message for i in fit.law_issues(bad, data))
    assert "alpha = 2.5 is outside (0.05, 2)" in reasons
    assert "above the lowest observed loss" in reasons


# --- Approach 2 -------------------------------------------------------------------------

def test_isoflop_budget_beyond_sampled_sizes_is_excluded():
    df = synthetic.isoflop_table(TRUTH, budgets=(1e17, 1e18, 1e19, 1e20),
                                 centre_factors=(1, 1, 1, 30), noise=0.001)
    res = isoflop.fit_isoflop(df["n_params_total"], df["val_loss"], df["flops"],
                              tokens=df["tokens"])
    interior = [b.interior for b in res.budgets]
    assert interior == [True, True, True, False]
    assert res.a == pytest.approx(A_TRUE, abs=0.02)
    assert res.verdict.identified
    # what including the edge budget would have given: the reason for excluding it
    every = isoflop._exponents([b for b in res.budgets if np.isfinite(b.n_opt)])[0]
    assert abs(every - A_TRUE) > abs(res.a - A_TRUE)
    budgets = res.to_dict()["budgets"]
    assert set(budgets[0]) >= {"compute", "n_opt", "d_opt", "loss_opt", "n_points", "interior"}
    assert budgets[-1]["interior"] is False


def test_downward_parabola_is_not_interior_and_single_budget_not_identified():
    n = np.logspace(7, 9, 7)
    hump = 3.0 - 0.01 * (np.log(n) - np.log(1e8)) ** 2
    out = isoflop.fit_parabola(n, hump, 1e18)
    assert not out.interior and np.isnan(out.n_opt) and "downward" in out.reason
    df = synthetic.isoflop_table(TRUTH, budgets=(1e18,))
    res = isoflop.fit_isoflop(df["n_params_total"], df["val_loss"], df["flops"])
    assert not res.verdict.identified
    assert "1 interior compute budget(s)" in res.verdict.reason
    assert res.to_dict()["a"] is None


def test_a_nearly_flat_parabola_puts_its_vertex_at_infinity_without_a_warning():
    import warnings

    n = np.logspace(7, 9, 7)
    tilt = 3.0 - 0.5 * np.log(n) + 1e-6 * np.log(n) ** 2  # vertex at log N = 2.5e5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning would fail the test
        out = isoflop.fit_parabola(n, tilt, 1e18)
    assert not out.interior and out.n_opt == np.inf and "outside the sampled" in out.reason


def test_moe_table_d_opt_uses_the_compute_definition():
    f = 0.25  # active / total
    df = synthetic.isoflop_table(TRUTH, active_fraction=f, noise=0.0)
    res = isoflop.fit_isoflop(df["n_params_total"], df["val_loss"], df["flops"],
                              tokens=df["tokens"])
    for b in res.budgets:
        assert b.d_opt * (6 * f * b.n_opt) == pytest.approx(b.flops, rel=1e-9)
        assert b.d_opt * (6 * b.n_opt) != pytest.approx(b.flops, rel=0.5)  # not 6 N_total D
    # Approach 3 on the same table: allocation from the table's FLOPs per token
    law = fit.fit_data(fit.prepare(df))
    assert law.fpt[0] == pytest.approx(6 * f, rel=1e-6) and law.fpt[1] == pytest.approx(1.0)
    n_opt, d_opt = law.allocation(1e19)
    assert 6 * f * n_opt * d_opt == pytest.approx(1e19, rel=1e-9)
    assert law.to_dict()["n_kind"] == "total"


def test_cli_approach2_writes_budgets_and_bias(tmp_path, capsys):
    df = synthetic.isoflop_table(TRUTH, budgets=(1e17, 1e18, 1e19, 1e20),
                                 centre_factors=(1, 1, 1, 30), noise=0.001)
    path = tmp_path / "iso.csv"
    df.rename(columns={"n_params_total": "params", "flops": "C"}).to_csv(path, index=False)
    out = tmp_path / "iso.json"
    assert run_cli("fit", path, "--approach", "2", "--c-col", "C", "--n-col", "params",
                   "--loss-col", "val_loss", "--bootstrap", "20", "-o", out) == 0
    record = json.loads(out.read_text())
    assert record["identified"] is True and record["a"] == pytest.approx(A_TRUE, abs=0.02)
    assert record["a"] + record["b"] == pytest.approx(1.0)
    assert [b["interior"] for b in record["budgets"]] == [True, True, True, False]
    assert "biased" in record["bias"] and record["columns"]["n"] == "params"
    assert "excluded" in capsys.readouterr().err


# --- prediction and leave-out ------------------------------------------------------------

def test_predict_and_test_where(tmp_path, capsys):
    path = tmp_path / "grid.csv"
    synthetic.chinchilla_table(TRUTH, noise=0.003).to_csv(path, index=False)
    out = tmp_path / "fit.json"
    assert run_cli("fit", path, "--where", "tpp >= 5", "--test-where", "n_params_total == 1e9",
                   "--bootstrap", "12", "-o", out) == 0
    record = json.loads(out.read_text())
    test = record["test"]
    assert test["n_points"] == 6  # every row at N = 1e9 (--test-where reads the whole table)
    rel = [abs(r["predicted"] - r["observed"]) / r["observed"] for r in test["rows"]]
    assert test["mean_abs_rel_error"] == pytest.approx(np.mean(rel))
    assert record["n_points"] == 25
    assert run_cli("fit", path, "--test-where", "n_params_total == 1e9 and tpp > 20",
                   "-o", tmp_path / "two.json") == 0
    assert json.loads((tmp_path / "two.json").read_text())["test"]["n_points"] == 2
    pred = predict_from_record(record, 1e9, 2e10)
    expected = laws.chinchilla(1e9, 2e10, **record["params"])
    assert pred["loss"] == pytest.approx(expected)
    lo, hi = pred["interval"]
    assert lo <= pred["loss"] <= hi
    capsys.readouterr()
    assert run_cli("predict", out, "--n", "1e9", "--d", "2e10", "--format", "json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["loss"] == pytest.approx(expected) and shown["interval"] == [lo, hi]


def test_predict_errors(tmp_path):
    with pytest.raises(ValueError, match="Approach-3"):
        predict_from_record({"approach": 2, "a": 0.5}, 1e9, 1e10)
    with pytest.raises(ValueError, match="--d"):
        predict_from_record({"law": "chinchilla", "params": TRUTH}, 1e9)
    fixed = {"law": "fixed_data", "params": {"E": 2.0, "A": 300.0, "alpha": 0.3}}
    assert predict_from_record(fixed, 1e8)["loss"] == pytest.approx(2 + 300 * 1e8 ** -0.3)
    assert predict_from_record(fixed, 1e8)["interval"] is None


# --- columns: errors, dropping, mapping ---------------------------------------------------

@pytest.fixture
def grid_csv(tmp_path):
    path = tmp_path / "grid.csv"
    synthetic.chinchilla_table(TRUTH, noise=0.003).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("edit, argv, fragments", [
    (lambda df: df.drop(columns=["val_loss"]).assign(train_loss=3.0), [], ["'val_loss'"]),
    (lambda df: df.assign(val_loss="high"), [], ["'val_loss'", "non-numeric", "'high'"]),
    (lambda df: df.assign(val_loss=np.nan), [], ["'val_loss'", "no numeric value"]),
    (lambda df: df, ["--n-col", "params"], ["params"]),
    (lambda df: df.assign(tokens=-1.0), [], ["'tokens'", "non-positive"]),
    (lambda df: df, ["--where", "nope >"], ["--where"]),
    (lambda df: df, ["--where", "tpp > 1e9"], ["selects no rows"]),
    (lambda df: df, ["--approach", "2", "--c-col", "C"], ["C"]),
])
def test_every_column_error_is_one_line_naming_the_column(grid_csv, edit, argv, fragments):
    edit(pd.read_csv(grid_csv)).to_csv(grid_csv, index=False)
    with pytest.raises((TableError, ValueError)) as exc:
        run_cli("fit", grid_csv, *argv)
    one_line(exc, *fragments)


def test_non_numeric_val_loss_never_falls_back_to_train_loss(grid_csv):
    df = pd.read_csv(grid_csv).assign(train_loss=3.0)
    df["val_loss"] = df["val_loss"].astype(object)
    df.loc[0, "val_loss"] = "n/a?"
    df.to_csv(grid_csv, index=False)
    with pytest.raises(TableError, match="'val_loss' has 1 non-numeric"):
        run_cli("fit", grid_csv)


def test_plot_and_report_on_a_foreign_table_via_flags_and_toml(tmp_path, capsys):
    pocket = synthetic.pocket_table()
    foreign = pd.DataFrame({"P": pocket["n_params_total"], "T": pocket["tokens"],
                            "L": pocket["val_loss"], "S": pocket["sparsity"],
                            "W": pocket["d_model"], "gsm": pocket["task/arith/loss"]})
    path = tmp_path / "foreign.csv"
    foreign.to_csv(path, index=False)
    with pytest.raises(TableError, match="no figure could be made"):
        run_cli("plot", path, "-o", tmp_path / "none")
    assert "missing column(s) 'n_params_total' (--n-col)" in capsys.readouterr().out
    assert run_cli("plot", path, "-o", tmp_path / "figs", "--n-col", "P", "--d-col", "T",
                   "--loss-col", "L", "--sparsity-col", "S", "--width-col", "W",
                   "--task-col", "gsm=gsm:reasoning") == 0
    made = {p.stem for p in (tmp_path / "figs").glob("*.png")}
    assert {"fig1_loss_vs_params", "fig2_task_vs_pretrain", "fig3_task_vs_sparsity"} <= made
    mapping = tmp_path / "cols.toml"
    mapping.write_text('n = "P"\nd = "T"\nloss = "L"\nsparsity = "S"\nwidth = "W"\n'
                       '[tasks.gsm]\nloss = "gsm"\nkind = "reasoning"\n')
    assert run_cli("report", path, "-o", tmp_path / "r.md", "--columns", mapping,
                   "--bootstrap", "8") == 0
    text = (tmp_path / "r.md").read_text()
    assert "gsm (reasoning)" in text and "'P' (--n-col)" in text
    with pytest.raises(TableError, match="'nope' named by --n-col"):
        run_cli("report", path, "-o", tmp_path / "r2.md", "--n-col", "nope")
    with pytest.raises(TableError, match="NAME=COLUMN"):
        run_cli("plot", path, "-o", tmp_path / "f", "--task-col", "gsm")


def test_report_with_nothing_to_make_exits_nonzero(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 4.0]}).to_csv(path, index=False)
    with pytest.raises(TableError, match="nothing could be made"):
        run_cli("report", path, "-o", tmp_path / "r.md")


# --- the report states no non-identified number as a finding -------------------------------

def test_pocket_report_quotes_no_unidentified_law(tmp_path):
    text = make_report(synthetic.pocket_table(), tmp_path / "report.md", n_boot=10).read_text()
    assert "L(N, D) = E + A/N^alpha + B/D^beta: not identified: D/N is the same" in text
    assert "| alpha |" not in text and "Compute-optimal allocation" not in text
    assert "N_opt ~ C^" not in text
    record = json.loads((tmp_path / "report.json").read_text())
    assert record["approach3"]["identified"] is False
    objects = [record["approach3"], record["fixed_data"], *record["ushape_sparsity"],
               *record["slopes"], *record["topk_effect"]]
    assert all(isinstance(o["identified"], bool) and isinstance(o["warnings"], list)
               for o in objects)
    rows = [line.split("|") for line in text.splitlines() if "| not identified" in line]
    assert rows
    for cells in rows:  # a not-identified row shows no estimate, interval or SE after it
        at = next(i for i, c in enumerate(cells) if c.strip().startswith("not identified"))
        assert cells[at + 1].strip() == "-"


def test_grid_report_states_identified_law(tmp_path):
    df = synthetic.chinchilla_table(TRUTH, noise=0.003)
    text = make_report(df, tmp_path / "report.md", n_boot=8).read_text()
    assert "Identified. Bootstrap" in text and "| alpha |" in text
    assert "Compute-optimal allocation" in text


# --- speed: no torch for the analysis commands ---------------------------------------------

@pytest.mark.parametrize("argv", [["fit", "{table}", "-o", "{out}"], ["fit", "--help"],
                                  ["--help"], ["predict", "--help"], ["plot", "--help"],
                                  ["report", "--help"]])
def test_analysis_commands_do_not_import_torch(tmp_path, argv):
    table = tmp_path / "grid.csv"
    synthetic.chinchilla_table(TRUTH).to_csv(table, index=False)
    argv = [a.format(table=table, out=tmp_path / "fit.json") for a in argv]
    code = (f"import sys\nfrom moe.app.cli import main\ntry:\n    rc = main({argv!r})\n"
            "except SystemExit as exc:\n    rc = exc.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH 0", out.stdout + out.stderr


def test_cli_writes_an_unidentified_fit_and_warns(tmp_path, capsys):
    path = tmp_path / "narrow.csv"
    synthetic.chinchilla_table(TRUTH, n_values=(1e8, 1.3e8, 1.6e8, 2e8)).to_csv(path,
                                                                               index=False)
    out = tmp_path / "fit.json"
    assert run_cli("fit", path, "-o", out) == 0
    record = json.loads(out.read_text())
    assert record["identified"] is False and record["params"]
    io = capsys.readouterr()
    assert "warning: approach 3 fit: N (n_params_total) spans only a factor of 2" in io.err
    assert "not identified: N (n_params_total) spans only" in io.out


def test_bad_column_mapping_file(tmp_path, grid_csv):
    bad = tmp_path / "cols.toml"
    bad.write_text("n = [unclosed\n")
    with pytest.raises(TableError, match="column mapping"):
        run_cli("plot", grid_csv, "-o", tmp_path / "f", "--columns", bad)
    bad.write_text('[tasks.gsm]\nkind = "reasoning"\n')
    with pytest.raises(TableError, match="loss ="):
        run_cli("plot", grid_csv, "-o", tmp_path / "f", "--columns", bad)
    bad.write_text('size = "P"\n')
    with pytest.raises(TableError, match="unknown column role"):
        run_cli("plot", grid_csv, "-o", tmp_path / "f", "--columns", bad)

"""Bad tables give one-line errors (through the CLI handlers too); files are written atomically."""

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from moe.analysis import TableError, fit, synthetic
from moe.analysis.tables import read_table
from moe.app import analysis_cmd as cli
from moe.io import atomic_write_text


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="moe")
    cli.register(parser.add_subparsers())
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def good_table():
    truth = {"E": 1.8, "A": 450.0, "B": 2000.0, "alpha": 0.34, "beta": 0.37}
    return synthetic.chinchilla_table(truth, noise=0.002)


def one_line_error(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg


def test_missing_column(good_table, tmp_path):
    path = tmp_path / "t.csv"
    good_table.drop(columns=["tokens"]).to_csv(path, index=False)
    with pytest.raises(TableError) as exc:
        run_cli("fit", path)
    one_line_error(exc, "tokens")


def test_missing_loss_names_val_loss(good_table):
    with pytest.raises(TableError) as exc:
        fit.prepare(good_table.drop(columns=["val_loss"]).assign(train_loss=3.0))
    one_line_error(exc, "val_loss")


@pytest.mark.parametrize("column", ["n_params_total", "tokens", "val_loss"])
def test_non_positive_values(good_table, tmp_path, column):
    bad = good_table.copy()
    bad.loc[3, column] = 0.0
    path = tmp_path / "t.parquet"
    bad.to_parquet(path)
    with pytest.raises(TableError) as exc:
        run_cli("fit", path, "--loss-col", "val_loss")
    one_line_error(exc, column, "non-positive")


def test_nan_rows_are_dropped_and_counted(good_table, tmp_path, capsys):
    bad = good_table.copy()
    bad.loc[[1, 2], "val_loss"] = np.nan
    data = fit.prepare(bad, loss_col="val_loss")
    assert data.n_nan_dropped == 2 and len(data.loss) == len(bad) - 2
    path = tmp_path / "t.csv"
    bad.to_csv(path, index=False)
    assert run_cli("fit", path) == 0
    assert "dropped 2 row(s) with NaN" in capsys.readouterr().err


def test_too_few_points(good_table):
    with pytest.raises(TableError) as exc:
        fit.prepare(good_table.head(4), loss_col="val_loss")
    one_line_error(exc, "at least 5 rows")


def test_sweep_dir_without_results_parquet(tmp_path):
    with pytest.raises(TableError) as exc:
        run_cli("plot", tmp_path, "-o", tmp_path / "figs")
    one_line_error(exc, "moe sweep collect")


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "nope.csv")
    odd = tmp_path / "t.xlsx"
    odd.write_text("x")
    with pytest.raises(TableError) as exc:
        read_table(odd)
    one_line_error(exc, "unknown table format")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_duplicate_columns_are_an_error_naming_them(good_table, tmp_path, suffix):
    twice = pd.concat([good_table, good_table[["val_loss", "tokens"]] * 2], axis=1)
    assert list(twice.columns).count("val_loss") == 2
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        twice.to_csv(path, index=False)
    else:  # pandas refuses to write duplicates; pyarrow, like other tools, does not
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_arrays([pa.array(twice.iloc[:, i]) for i in
                                             range(twice.shape[1])], names=list(twice.columns)),
                       path)
    with pytest.raises(TableError) as exc:
        run_cli("fit", path)
    one_line_error(exc, str(path), "duplicate column(s) 'tokens', 'val_loss'")


def test_missing_table_is_an_error_naming_it(tmp_path, capsys):
    from moe.app.cli import main

    for command in (["fit"], ["report"]):
        assert main([*command, str(tmp_path / "nope.csv")]) == 2
        assert str(tmp_path / "nope.csv") in capsys.readouterr().err


def test_undecodable_csv_names_the_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("n_params_total,tokens,val_loss,note\n1,2,3,caf\xe9\n".encode("latin-1"))
    with pytest.raises(TableError) as exc:
        read_table(path)
    one_line_error(exc, str(path))


def test_unknown_law_and_bad_bootstrap(good_table, tmp_path):
    with pytest.raises(TableError):
        fit.prepare(good_table, law="kaplan")
    path = tmp_path / "t.csv"
    good_table.to_csv(path, index=False)
    with pytest.raises(TableError) as exc:
        run_cli("fit", path, "--bootstrap", "1")
    one_line_error(exc, "--bootstrap")


def test_val_loss_never_falls_back_to_train_loss(tmp_path):
    df = pd.DataFrame({"val_loss": [np.nan, 2.0], "train_loss": [3.0, 2.5]})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    table = read_table(path)
    assert "pretrain_loss" not in table
    from moe.analysis.columns import ensure_canonical
    assert ensure_canonical(table)["pretrain_loss"].isna().tolist() == [True, False]
    assert "pretrain_loss" in ensure_canonical(df.drop(columns=["val_loss"])).attrs["missing"]


def test_cli_fit_writes_fit_json(good_table, tmp_path):
    path = tmp_path / "results.parquet"
    good_table.to_parquet(path)
    out = tmp_path / "fit.json"
    assert run_cli("fit", tmp_path, "--bootstrap", "8", "-o", out) == 0  # a sweep directory
    record = json.loads(out.read_text())
    assert set(record["params"]) == {"E", "A", "B", "alpha", "beta"}
    for key in ("objective", "n_points", "intervals", "a", "b", "seconds"):
        assert key in record
    assert record["n_points"] == 36
    assert set(record["intervals"]) >= {"E", "alpha", "beta", "a", "b", "tpp_opt"}
    assert record["params"]["alpha"] == pytest.approx(0.34, abs=0.01)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]

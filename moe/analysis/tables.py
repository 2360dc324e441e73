"""Reading and validating results tables (output files are written atomically by `moe.io`).

A results table has one row per run; its columns, their meaning and units are the results
record's (`moe.record`: `COLUMNS` first, then ``task/<name>/<metric>`` per task, then the
rest).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from moe.errors import BadInput
from moe.record import TASK_PREFIX, task_column  # noqa: F401 (TASK_PREFIX is re-exported)
from moe.sweepdir import SweepDir

MIN_POINTS = 5
PRETRAIN_LOSS = "pretrain_loss"  # the loss role in a canonical frame (moe.analysis.columns)


class TableError(BadInput):
    """A results table cannot be used as asked; the message is one line a user can act on."""


def read_table(source: str | os.PathLike) -> pd.DataFrame:
    """Read a results table from a csv/parquet file or a sweep directory's results.parquet."""
    path = Path(source)
    if path.is_dir():
        table = SweepDir(path).results_path
        if not table.is_file():
            raise TableError(
                f"{path} has no results.parquet; run `moe sweep collect {path}` first")
        path = table
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such table", str(path))  # names the path
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".csv", ".txt"):
            _refuse_duplicate_columns(path, suffix)
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".txt"):
            df = pd.read_csv(path)
        else:
            raise TableError(f"{path}: unknown table format {suffix!r} (use .csv or .parquet)")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        if isinstance(exc, TableError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"cannot read {path}: {first}") from exc
    return df


def _refuse_duplicate_columns(path: Path, suffix: str) -> None:
    """TableError naming every column the file's header gives twice: pandas would rename the
    second `val_loss` to `val_loss.1` (CSV) or keep one of them, and either would be used
    without a word."""
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    else:
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            names = next(csv.reader(f), [])
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})
    if dups:
        raise TableError(f"{path} has duplicate column(s) {', '.join(map(repr, dups))}; "
                         "keep one of each (which one is meant cannot be guessed)")


def require_columns(df: pd.DataFrame, columns: list[str], *, purpose: str) -> None:
    """Raise TableError naming every missing column (and the available ones)."""
    missing = [repr(c) for c in columns if c not in df.columns]
    if missing:
        shown = ", ".join(map(str, list(df.columns)[:12]))
        more = "" if len(df.columns) <= 12 else ", ..."
        raise TableError(f"{purpose} needs column(s) {', '.join(missing)}; "
                         f"the table has: {shown}{more}")


def numeric_column(df: pd.DataFrame, col: str, *, purpose: str) -> np.ndarray:
    """A used column as floats: a one-line error when it is missing, holds non-numeric
    values or holds no value at all (never replaced by another column). NaN stays NaN."""
    require_columns(df, [col], purpose=purpose)
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = raw.notna().to_numpy() & np.isnan(values)
    if bad.any():
        example = raw[bad].iloc[0]
        raise TableError(f"column {col!r} has {int(bad.sum())} non-numeric value(s) (e.g. "
                         f"{example!r}); {purpose} needs numbers there")
    if not np.isfinite(values).any():
        raise TableError(f"column {col!r} has no numeric value (all missing/NaN); "
                         f"{purpose} needs it filled")
    return values


def used_columns(df: pd.DataFrame, columns: list[str], *, purpose: str,
                 positive: bool = True,
                 min_points: int = MIN_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The used columns as floats (n_kept, len(columns)) and the boolean mask of kept rows.

    Rows with NaN in any used column are dropped (the caller reports how many); a missing,
    non-numeric or all-NaN column, a non-positive value (with ``positive``) or fewer than
    ``min_points`` rows left is a one-line TableError.
    """
    require_columns(df, columns, purpose=purpose)
    values = np.column_stack([numeric_column(df, c, purpose=purpose) for c in columns])
    keep = np.all(np.isfinite(values), axis=1)
    values = values[keep]
    if positive:
        for j, col in enumerate(columns):
            bad_sign = int(np.sum(values[:, j] <= 0))
            if bad_sign:
                raise TableError(f"column {col!r} has {bad_sign} non-positive value(s); "
                                 f"{purpose} needs every value > 0")
    if len(values) < min_points:
        dropped = f" after dropping {int((~keep).sum())} row(s) with NaN" if (~keep).any() else ""
        raise TableError(f"{purpose} needs at least {min_points} rows, the table has "
                         f"{len(values)}{dropped}")
    return values, keep


def finite_rows(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rows where every named column is numeric, finite and positive (for lenient reports)."""
    keep = np.ones(len(df), dtype=bool)
    for col in columns:
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        keep &= np.isfinite(v) & (v > 0)
    return df.loc[keep]


def task_names(df: pd.DataFrame) -> list[str]:
    """Task names found in ``task/<name>/<metric>`` columns, in column order."""
    names: list[str] = []
    for col in df.columns:
        parts = str(col).split("/")
        if len(parts) == 3 and parts[0] == "task" and parts[1] not in names:
            names.append(parts[1])
    return names


def task_kind(df: pd.DataFrame, task: str) -> str:
    """The task's kind ("memorization", "reasoning"), or "unknown" without a kind column."""
    col = task_column(task, "kind")
    if col not in df.columns:
        return "unknown"
    kinds = df[col].dropna().astype(str).unique()
    return str(kinds[0]) if len(kinds) else "unknown"


def _quote_columns(expr: str, columns) -> str:
    """``expr`` with every column name that is not a Python identifier (dotted names from
    experiment-tracker exports, ``task/x/loss``, names with spaces) put in backticks, the
    quoting pandas' query needs; names already in backticks are left alone."""
    special = sorted((str(c) for c in columns if not str(c).isidentifier()), key=len,
                     reverse=True)
    if not special:
        return expr
    parts = re.split(r"(`[^`]*`|'[^']*'|\"[^\"]*\")", expr)  # keep quoted spans as they are
    pattern = re.compile(r"(?<![\w.`])(" + "|".join(map(re.escape, special)) + r")(?![\w`])")
    return "".join(p if i % 2 else pattern.sub(r"`\1`", p) for i, p in enumerate(parts))


def select(df: pd.DataFrame, expr: str | None, flag: str) -> pd.DataFrame:
    """Rows selected by a pandas query (``--where``/``--test-where``); column names with dots
    or slashes work as written. A bad expression or an empty selection is a one-line error
    naming the flag."""
    if expr is None:
        return df
    try:
        out = df.query(_quote_columns(expr, df.columns))
    except Exception as exc:  # pandas raises many types for a bad expression
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"{flag} {expr!r}: {first}") from None
    if out.empty:
        raise TableError(f"{flag} {expr!r} selects no rows")
    return out

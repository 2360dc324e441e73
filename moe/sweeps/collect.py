"""`moe sweep collect`: one results table from every run's result.json.

The table's schema -- the contract's columns first, always present, then every
`task/<name>/...` column found, then the rest of the records' keys -- and the rules for a
usable record are the results record's (`moe.record`). A run whose result.json is missing,
unreadable, not an object or lacks a loss is reported and skipped; collect never crashes on
one bad run. The table is written atomically (.parquet or .csv).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe.io import atomic_write_bytes
from moe.record import read_result, results_frame
from moe.sweepdir import SweepDir
from moe.sweeps.spec import SpecError
from moe.sweeps.status import run_dirs

if TYPE_CHECKING:
    import pandas as pd

SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True, kw_only=True)
class Collected:
    """The table and the runs left out of it, with why."""

    table: pd.DataFrame
    skipped: tuple[tuple[str, str], ...]
    """(run_id, reason) for every run not in the table."""
    path: Path | None = None


def collect(sweep: SweepDir | str | os.PathLike,
            out: str | os.PathLike | None = None) -> Collected:
    """Gather result.json records into a table; write it to `out` (default
    SWEEP_DIR/results.parquet)."""
    sweep = sweep if isinstance(sweep, SweepDir) else SweepDir(sweep)
    out = Path(out) if out is not None else sweep.results_path
    if out.suffix not in SUFFIXES:
        raise SpecError(f"output {out} must end in {' or '.join(SUFFIXES)}")
    records, skipped = [], []
    for run in run_dirs(sweep):
        record, reason = read_result(run)
        if record is None:
            skipped.append((run.name, reason))
        else:
            records.append(record)
    table = results_frame(records)
    atomic_write_bytes(out, _encode(table, out.suffix))
    return Collected(table=table, skipped=tuple(skipped), path=out)


def _encode(frame: pd.DataFrame, suffix: str) -> bytes:
    if suffix == ".csv":
        return frame.to_csv(index=False).encode("utf-8")
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()

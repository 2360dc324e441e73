"""`moe sweep collect`: one results table from every run's result.json.

Columns follow docs/architecture.md, "Results table" (run_id, d_model, n_layers,
n_experts, top_k, sparsity, n_params_total, n_params_active, n_params_embedding, tokens, tpp, flops,
train_loss, val_loss), then every `task/<name>/...` column found, then the
rest of the records' keys. A run whose result.json is missing, unreadable, not
an object or lacks a loss is reported and skipped; collect never crashes on
one bad run. The table is written atomically (.parquet or .csv).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe.io import atomic_write_bytes
from moe.rundir import RunDir
from moe.sweeps.spec import SpecError
from moe.sweeps.status import run_dirs

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("run_id", "d_model", "n_layers", "n_experts", "top_k", "sparsity",
           "n_params_total", "n_params_active", "n_params_embedding", "tokens", "tpp", "flops",
           "train_loss", "val_loss")
SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True, kw_only=True)
class Collected:
    """The table and the runs left out of it, with why."""

    table: pd.DataFrame
    skipped: tuple[tuple[str, str], ...]
    """(run_id, reason) for every run not in the table."""
    path: Path | None = None


def collect(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Collected:
    """Gather result.json records into a table; write it to `out` (default results.parquet)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir / "results.parquet"
    if out.suffix not in SUFFIXES:
        raise SpecError(f"output {out} must end in {' or '.join(SUFFIXES)}")
    records, skipped = [], []
    for run_dir in run_dirs(sweep_dir):
        record, reason = read_result(run_dir)
        if record is None:
            skipped.append((run_dir.name, reason))
        else:
            records.append(record)
    table = results_frame(records)
    atomic_write_bytes(out, _encode(table, out.suffix))
    return Collected(table=table, skipped=tuple(skipped), path=out)


def read_result(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(record, "") for a good result.json, else (None, why it was skipped)."""
    path = RunDir(run_dir).result_path
    if not path.is_file():
        return None, "no result.json (not finished)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"malformed result.json: {exc}"
    except RecursionError:  # e.g. [[[[...]]]] nested deeper than the parser's stack
        return None, "malformed result.json: nested too deeply to parse"
    if not isinstance(record, dict):
        return None, f"malformed result.json: expected an object, got {type(record).__name__}"
    bad = [k for k, v in record.items() if isinstance(v, (dict, list))]
    record = {k: v for k, v in record.items() if k not in bad}  # the record is flat
    if not _is_number(record.get("train_loss")) and not _is_number(record.get("val_loss")):
        return None, "result.json has no numeric train_loss or val_loss"
    if record.setdefault("run_id", run_dir.name) != run_dir.name:
        return None, f"result.json run_id {record['run_id']!r} != directory {run_dir.name!r}"
    return record, ""


def results_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The contract's columns first (always present), then task/ columns, then the rest."""
    import pandas as pd

    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    tasks = sorted(k for k in seen if k.startswith("task/"))
    rest = [k for k in seen if k not in COLUMNS and not k.startswith("task/")]
    frame = pd.DataFrame.from_records(records, columns=[*COLUMNS, *tasks, *rest])
    if len(frame) and frame["sparsity"].isna().any():
        derived = 1.0 - frame["top_k"] / frame["n_experts"]
        frame["sparsity"] = frame["sparsity"].fillna(derived)
    return frame.sort_values("run_id", kind="stable").reset_index(drop=True)


def _encode(frame: pd.DataFrame, suffix: str) -> bytes:
    if suffix == ".csv":
        return frame.to_csv(index=False).encode("utf-8")
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)

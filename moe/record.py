"""The results record: one flat JSON object per run (RUN_DIR/result.json), one row per run
in a results table (SWEEP_DIR/results.parquet).

This module is the record's one owner: its columns with their meaning and unit
(`COLUMNS`, `TASK_METRICS`), the writer every producer calls (`build_result`: `moe train`,
`moe merge`, `moe ensemble`), the reader of one run's record (`read_result`) and the
table's schema (`results_frame`: the contract's columns first, always present, then the
task columns, then the rest). Collect, the recipes and the analysis readers use it, so a
column is added, renamed or documented here and nowhere else.

It imports no torch (the analysis layer reads the schema), and it sits at the bottom layer
so that training, the recipes, the sweep layer and the analysis may all import it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moe.config import config_hash, sparsity
from moe.params import count_params, resolve_tokens, train_flops_per_token

if TYPE_CHECKING:
    import pandas as pd

    from moe.config import RunConfig
    from moe.rundir import RunDir


@dataclass(frozen=True, kw_only=True)
class Column:
    """One column of the record: its name, what it means, and its unit."""

    name: str
    meaning: str
    unit: str


COLUMNS: tuple[Column, ...] = (
    Column(name="run_id", meaning="hash of the run's config (moe.config.config_hash); the run "
           "directory's name", unit="-"),
    Column(name="d_model", meaning="model width", unit="dimensions"),
    Column(name="n_layers", meaning="transformer blocks", unit="layers"),
    Column(name="n_experts", meaning="experts per MoE layer (1: a dense model)", unit="experts"),
    Column(name="top_k", meaning="experts each token is routed to", unit="experts"),
    Column(name="sparsity", meaning="1 - top_k / n_experts (moe.config.sparsity)", unit="-"),
    Column(name="n_params_total", meaning="all parameters, embeddings included",
           unit="parameters"),
    Column(name="n_params_active", meaning="parameters one token's forward uses (top_k of "
           "n_experts experts), embeddings included", unit="parameters"),
    Column(name="n_params_embedding", meaning="input embedding + untied output head",
           unit="parameters"),
    Column(name="tokens", meaning="training tokens (train.tokens or train.tpp x total "
           "parameters)", unit="tokens"),
    Column(name="tpp", meaning="tokens / n_params_total", unit="tokens per parameter"),
    Column(name="flops", meaning="training compute spent: train_flops_per_token (6 x active "
           "parameters + attention) x tokens", unit="FLOPs"),
    Column(name="train_loss", meaning="mean training cross-entropy of the last 20 steps",
           unit="nats/token"),
    Column(name="val_loss", meaning="cross-entropy on the fixed held-out batches",
           unit="nats/token"),
)
"""The contract's columns: every results table has them, in this order."""

HEADLINE = tuple(c.name for c in COLUMNS)

METRICS: tuple[Column, ...] = (
    Column(name="steps", meaning="optimizer steps of the whole run", unit="steps"),
    Column(name="epochs", meaning="tokens / training split's tokens", unit="epochs"),
    Column(name="tokens_per_s", meaning="training throughput of this job's steps (none when "
           "nothing was trained)", unit="tokens/s"),
    Column(name="train_wall_s", meaning="wall time of this job's training steps", unit="s"),
    Column(name="device", meaning="torch device the run trained on", unit="-"),
    Column(name="world_size", meaning="data-parallel processes", unit="processes"),
    Column(name="val_loss_ema", meaning="val_loss of the EMA weights (train.ema_decay > 0)",
           unit="nats/token"),
    Column(name="recipe", meaning="merge | ensemble | ema for a recipe's record; absent for a "
           "trained run", unit="-"),
)
"""Other columns `moe train` and the recipes write (beside every config key as
`section.key`, lists joined with commas)."""

TASK_PREFIX = "task/"
TASK_METRICS: tuple[Column, ...] = (
    Column(name="loss", meaning="mean answer cross-entropy", unit="nats/token"),
    Column(name="bits_per_token", meaning="loss / ln 2", unit="bits/token"),
    Column(name="bits_per_byte", meaning="answer bits per UTF-8 byte", unit="bits/byte"),
    Column(name="accuracy", meaning="exact-match accuracy (none when not measured)",
           unit="fraction"),
    Column(name="kind", meaning="memorization | reasoning", unit="-"),
)
"""Per evaluated task `<name>`: the columns `task/<name>/<metric>`."""


def task_column(task: str, metric: str = "loss") -> str:
    """The record's column for `metric` of task `task`."""
    return f"{TASK_PREFIX}{task}/{metric}"


def build_result(cfg: RunConfig, **metrics: Any) -> dict[str, Any]:
    """The flat result record: headline columns, every config key, counts, metrics."""
    counts = count_params(cfg.model)
    tokens = resolve_tokens(cfg)
    record: dict[str, Any] = {
        "run_id": config_hash(cfg), "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers, "n_experts": cfg.model.n_experts,
        "top_k": cfg.model.top_k, "sparsity": cfg.model.sparsity,
        "n_params_total": counts.total, "n_params_active": counts.active,
        "n_params_embedding": counts.embedding, "tokens": tokens,
        "tpp": tokens / counts.total,
        "flops": train_flops_per_token(cfg.model) * tokens,
    }
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            record[f"{section}.{key}"] = ",".join(value) if isinstance(value, list) else value
    record.update(metrics)
    return record


def read_result(run: RunDir) -> tuple[dict[str, Any] | None, str]:
    """(record, "") for a usable result.json, else (None, why it was skipped).

    Usable: an object with a numeric train_loss or val_loss whose run_id is the directory's
    name; nested values (lists, objects) are dropped, as the record is flat.
    """
    path = run.result_path
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
    record = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    if not _is_number(record.get("train_loss")) and not _is_number(record.get("val_loss")):
        return None, "result.json has no numeric train_loss or val_loss"
    if record.setdefault("run_id", run.name) != run.name:
        return None, f"result.json run_id {record['run_id']!r} != directory {run.name!r}"
    return record, ""


def results_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The contract's columns first (always present), then task/ columns, then the rest;
    rows sorted by run_id. A record without `sparsity` gets it from top_k and n_experts."""
    import pandas as pd

    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    tasks = sorted(k for k in seen if k.startswith(TASK_PREFIX))
    rest = [k for k in seen if k not in HEADLINE and not k.startswith(TASK_PREFIX)]
    frame = pd.DataFrame.from_records(records, columns=[*HEADLINE, *tasks, *rest])
    if len(frame) and frame["sparsity"].isna().any():
        frame["sparsity"] = frame["sparsity"].fillna(sparsity(frame["top_k"], frame["n_experts"]))
    return frame.sort_values("run_id", kind="stable").reset_index(drop=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)

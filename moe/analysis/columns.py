"""Which table column plays which role: the mapping behind `--n-col`, `--columns FILE.toml`.

Any results table can be analysed: :class:`Columns` names, for each role (parameters N,
tokens D, compute C, loss, sparsity, ...), the column that holds it, and task loss columns
beyond the project's own ``task/<name>/loss``. :meth:`Columns.canonical` returns a frame
with the project's column names (what figures and reports read) plus, in
``frame.attrs["column_sources"]``, where each role came from, so a skipped figure or
section names the user's column and its flag.

A column that is named (on the command line or in the TOML file) must exist; a used column
that exists must be numeric and hold at least one value. Nothing is ever replaced by
another column.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import pandas as pd

from moe.analysis.tables import PRETRAIN_LOSS, TASK_PREFIX, TableError, numeric_column
from moe.config.tomlio import read_toml

# role -> (the project's column name in the canonical frame, command-line flag)
ROLES = {
    "n": ("n_params_total", "--n-col"),
    "n_active": ("n_params_active", "--n-active-col"),
    "d": ("tokens", "--d-col"),
    "c": ("flops", "--c-col"),
    "loss": (PRETRAIN_LOSS, "--loss-col"),
    "sparsity": ("sparsity", "--sparsity-col"),
    "width": ("d_model", "--width-col"),
    "top_k": ("top_k", "--top-k-col"),
    "n_experts": ("n_experts", "--n-experts-col"),
    "granularity": ("granularity", "--granularity-col"),
    "tpp": ("tpp", "--tpp-col"),
}
TASK_KINDS = ("memorization", "reasoning", "unknown")


@dataclass(frozen=True, kw_only=True)
class TaskColumn:
    name: str
    column: str
    kind: str = "unknown"

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise TableError(f"task name {self.name!r} must be non-empty and contain no '/'")
        if self.kind not in TASK_KINDS:
            raise TableError(f"task {self.name!r}: kind {self.kind!r} must be one of "
                             f"{', '.join(TASK_KINDS)}")


@dataclass(frozen=True, kw_only=True)
class Columns:
    """Column of each role; ``explicit`` holds the roles the user named."""

    n: str = "n_params_total"
    n_active: str = "n_params_active"
    d: str = "tokens"
    c: str = "flops"
    loss: str = "val_loss"
    sparsity: str = "sparsity"
    width: str = "d_model"
    top_k: str = "top_k"
    n_experts: str = "n_experts"
    granularity: str = "granularity"
    tpp: str = "tpp"
    tasks: tuple = ()  # of TaskColumn
    explicit: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        unknown = set(self.explicit) - set(ROLES)
        if unknown:
            raise TableError(f"unknown column role(s) {', '.join(sorted(unknown))}; "
                             f"roles: {', '.join(ROLES)}")

    @classmethod
    def build(cls, mapping: dict, tasks=()) -> Columns:
        """From {role: column} (roles with None left at their defaults)."""
        given = {k: str(v) for k, v in mapping.items() if v is not None}
        unknown = set(given) - set(ROLES)
        if unknown:
            raise TableError(f"unknown column role(s) {', '.join(sorted(unknown))}; "
                             f"roles: {', '.join(ROLES)}")
        return cls(**given, tasks=tuple(tasks), explicit=frozenset(given))

    @classmethod
    def from_toml(cls, path, overrides: dict | None = None, tasks=()) -> Columns:
        """A TOML mapping: ``role = "column"`` lines and ``[tasks.NAME]`` tables with
        ``loss = "column"`` and optional ``kind``; ``overrides`` (flags) win."""
        raw = read_toml(path, error=TableError, what="column mapping")
        task_table = raw.pop("tasks", {})
        found = [TaskColumn(name=name, column=str(spec.get("loss", "")),
                            kind=str(spec.get("kind", "unknown")))
                 for name, spec in task_table.items()]
        if any(not t.column for t in found):
            raise TableError(f"{path}: every [tasks.NAME] needs loss = \"column\"")
        merged = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        return cls.build(merged, tasks=(*found, *tasks))

    def require(self, df: pd.DataFrame, roles, *, purpose: str, columns: dict | None = None):
        """A one-line error naming the flag of the first role whose column is missing
        (``columns`` overrides a role's column, e.g. {"c": value of --c-col})."""
        for role in roles:
            col = (columns or {}).get(role) or getattr(self, role)
            if col not in df.columns:
                raise TableError(f"{purpose} needs column {col!r} (map it with "
                                 f"{ROLES[role][1]}); the table has: {_shown(df)}")

    def source(self, role: str) -> str:
        """'column (--flag)' for messages."""
        return f"{getattr(self, role)!r} ({ROLES[role][1]})"

    def canonical(self, df: pd.DataFrame) -> pd.DataFrame:
        """The table with each role under the project's name (others kept as they are);
        attrs["column_sources"] maps project names to 'column (--flag)' and
        attrs["missing"] lists roles whose column is absent."""
        out = df.copy()
        sources, names, missing = {}, {}, []
        for f in fields(self):
            if f.name not in ROLES:
                continue
            role, (name, _) = f.name, ROLES[f.name]
            col = getattr(self, role)
            sources[name] = self.source(role)
            names[name] = col
            empty = col in df.columns and not df[col].notna().any()
            if col not in df.columns or (empty and role not in self.explicit):
                if role in self.explicit:
                    raise TableError(f"column {col!r} named by {ROLES[role][1]} is not in the "
                                     f"table; it has: {_shown(df)}")
                if name in out.columns and name != col:
                    out = out.drop(columns=[name])
                missing.append(name)
                continue
            out[name] = numeric_column(df, col, purpose=f"{ROLES[role][1]} {col!r}")
        for task in self.tasks:
            if task.column not in df.columns:
                raise TableError(f"task column {task.column!r} ({task.name}) is not in the "
                                 f"table; it has: {_shown(df)}")
            out[f"{TASK_PREFIX}{task.name}/loss"] = numeric_column(
                df, task.column, purpose=f"task {task.name}")
            out[f"{TASK_PREFIX}{task.name}/kind"] = task.kind
            sources[f"{TASK_PREFIX}{task.name}/loss"] = repr(task.column)
        out.attrs["column_sources"] = sources
        out.attrs["column_names"] = names
        out.attrs["missing"] = missing
        return out


def _shown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    return ", ".join(cols[:12]) + (", ..." if len(cols) > 12 else "")


def parse_task_flag(text: str) -> TaskColumn:
    """NAME=COLUMN[:KIND] from `--task-col`."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise TableError(f"--task-col {text!r}: use NAME=COLUMN or NAME=COLUMN:KIND")
    column, _, kind = rest.partition(":")
    return TaskColumn(name=name.strip(), column=column, kind=kind or "unknown")


def describe_missing(frame: pd.DataFrame, names) -> str:
    """'n_params_total' -> "'params' (--n-col)" using the frame's column sources."""
    sources = frame.attrs.get("column_sources", {})
    return ", ".join(sources.get(n, repr(n)) for n in names)


def ensure_canonical(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` if it already went through :meth:`Columns.canonical`, else the default mapping
    (val_loss is the loss; no fallback to train_loss)."""
    if "column_sources" in df.attrs:
        return df
    return Columns().canonical(df)

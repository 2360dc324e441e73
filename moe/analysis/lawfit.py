"""Registry laws on a results table: inputs by role, the checked fit, its fit.json record, and
the held-out comparison behind `moe fit --compare`.

The bootstrap policy is :func:`moe.analysis.identify.resamples` (checks that need resamples
always run unless the user asks for 0 resamples, and then the verdict says "not checked").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe.analysis import identify, lawforms
from moe.analysis.columns import ROLES, Columns
from moe.analysis.lawforms import base, checks
from moe.analysis.tables import TableError, used_columns

# law variable -> (Columns role, what it is)
VARIABLES = {"n": ("n", "parameters"), "d": ("d", "tokens"), "e": ("n_experts", "experts"),
             "g": ("granularity", "granularity"), "s": ("sparsity", "sparsity (1 - k/E)")}


def inputs(df: pd.DataFrame, law: base.LawForm, cols: Columns, *, c_col: str | None = None,
           min_points: int = 5) -> tuple[dict, np.ndarray, dict]:
    """({role: array}, loss, {role: column}) for ``law``; a missing column is a one-line
    error naming the flag that maps it. With ``c_col``, D = C / (6 N)."""
    names = {}
    for var in law.variables:
        role, what = VARIABLES[var]
        col = c_col if (var == "d" and c_col) else getattr(cols, role)
        flag = "--c-col" if (var == "d" and c_col) else ROLES[role][1]
        if col not in df.columns:
            shown = ", ".join(map(str, list(df.columns)[:12]))
            raise TableError(f"the {law.name} law needs {what}: column {col!r} is not in the "
                             f"table (map it with {flag}); the table has: {shown}")
        names[var] = col
    names["loss"] = cols.loss
    purpose = f"the {law.name} fit"
    values, _ = used_columns(df, list(names.values()), purpose=purpose, positive=False,
                             min_points=min_points)
    for j, (var, col) in enumerate(names.items()):  # sparsity is a share: 0 (dense) is valid
        bad = (values[:, j] < 0) | (values[:, j] >= 1) if var == "s" else values[:, j] <= 0
        if bad.any():
            what, rule = ("outside [0, 1)", "in [0, 1)") if var == "s" else ("non-positive",
                                                                          "> 0")
            raise TableError(f"column {col!r} has {int(bad.sum())} {what} value(s); {purpose} "
                             f"needs every value {rule}")
    x = {var: values[:, j] for j, var in enumerate(law.variables)}
    if c_col and "d" in x:
        x["d"] = x["d"] / (6.0 * x["n"])
    return x, values[:, -1], names


def fit_checked(law: base.LawForm, x: dict, loss: np.ndarray, *, n_boot: int | None = None,
                seed: int = 0) -> base.FormFit:
    """Point fit plus every check, with :func:`records.resamples` bootstrap resamples."""
    k = identify.resamples(n_boot)
    return checks.checked(base.fit(law, x, loss), x, loss, n_boot=k, seed=seed,
                          skip_why="--bootstrap 0")


def record(result: base.FormFit, columns: dict) -> dict:
    """The fit.json record of a registry law (what `moe predict` reads back)."""
    law = result.law
    return {"approach": 3, "law": law.name, "formula": law.formula, "citation": law.citation,
            "params": dict(result.params), **result.verdict.to_dict(),
            "checks": result.checks, "objective": result.objective,
            "n_points": result.n_points, "huber_delta": base.DELTA,
            "intervals": {k: [float(v[0]), float(v[1])] for k, v in result.intervals.items()},
            "bootstrap": {"samples": {k: [float(s) for s in v]
                                      for k, v in result.samples.items()}},
            "ranges": {k: [float(v[0]), float(v[1])] for k, v in result.ranges.items()},
            "columns": dict(columns), "seconds": result.seconds,
            **({"notes": law.notes} if law.notes else {})}


def held_out_error(result: base.FormFit, x: dict, loss: np.ndarray, level: float = 0.95):
    """(mean |relative error| on held-out rows, its interval over the bootstrap draws)."""
    err = float(np.mean(np.abs(result.predict(x) / loss - 1.0)))
    draws = []
    names = result.law.params
    for j in range(len(next(iter(result.samples.values()), []))):
        p = {k: float(result.samples[k][j]) for k in names}
        with np.errstate(all="ignore"):
            draws.append(float(np.mean(np.abs(result.law.predict(x, p) / loss - 1.0))))
    draws = np.array([d for d in draws if np.isfinite(d)])
    tail = 100 * (1 - level) / 2
    iv = (tuple(float(q) for q in np.percentile(draws, [tail, 100 - tail]))
          if len(draws) > 1 else None)
    return err, iv


def largest_compute(df: pd.DataFrame, compute: np.ndarray, factor: float = 2.0) -> pd.Index:
    """The default held-out rows: compute within ``factor`` of the table's largest."""
    return df.index[compute >= np.nanmax(compute) / factor]


def compare(names, train: pd.DataFrame, test: pd.DataFrame, cols: Columns, *,
            c_col: str | None = None, n_boot: int | None = None, seed: int = 0) -> dict:
    """Each law fitted on ``train`` and scored on ``test``; the chosen law has the lowest
    held-out error among the identified ones (among all, said so, when none is)."""
    rows = []
    for name in names:
        law = lawforms.get(name)
        x, loss, _ = inputs(train, law, cols, c_col=c_col)
        xt, loss_t, _ = inputs(test, law, cols, c_col=c_col, min_points=1)
        result = fit_checked(law, x, loss, n_boot=n_boot, seed=seed)
        err, iv = held_out_error(result, xt, loss_t)
        rows.append({"law": name, "held_out_mean_abs_rel_error": err,
                     "interval": None if iv is None else list(iv),
                     "identified": result.verdict.identified,
                     "reason": result.verdict.reason, "n_params": len(law.params),
                     "n_train": len(loss), "n_test": len(loss_t), "params": result.params})
    pool = [r for r in rows if r["identified"]] or rows
    best = min(r["held_out_mean_abs_rel_error"] for r in pool)
    tied = [r for r in pool if r["held_out_mean_abs_rel_error"] <= best * (1 + 1e-6) + 1e-15]
    chosen = tied[0]  # among laws tied to 1e-6 (the same family), the first one asked for
    ties = [r["law"] for r in tied[1:]]
    return {"laws": rows, "chosen": chosen["law"], "tied_with": ties,
            "chosen_among": "identified laws" if pool is not rows else
            "all laws (none is identified)",
            "rule": "lowest held-out mean |relative error| among the identified laws"}

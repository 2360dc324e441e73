"""Predictions and optimal allocations from a saved fit (fit.json), with bootstrap intervals
when the fit stored its resamples, warnings when asked to extrapolate, and a refusal (naming
the file) for a JSON that is not a fit."""

from __future__ import annotations

import numpy as np

from moe.analysis import lawforms
from moe.analysis.fit import PARAM_NAMES, predict_params
from moe.analysis.lawforms import allocate
from moe.errors import BadInput

VARIABLE_NAMES = {"n": "N", "d": "D", "e": "E (experts)", "g": "G (granularity)",
                  "s": "S (sparsity)"}


def check_record(record, path: str) -> str:
    """The fit's law name; a one-line error naming ``path`` when it is not a fit."""
    if not isinstance(record, dict) or "params" not in record or "law" not in record:
        what = ("an Approach-2 fit (exponents only): moe predict needs an Approach-3 fit "
                "(a law)"
                if isinstance(record, dict) and record.get("approach") == 2 else
                "not a fit written by `moe fit` (no 'law' and 'params')")
        raise BadInput(f"{path} is {what}")
    law = record["law"]
    if law not in PARAM_NAMES and law not in lawforms.REGISTRY:
        raise BadInput(f"{path}: unknown law {law!r} in the fit file")
    names = PARAM_NAMES.get(law) or lawforms.REGISTRY[law].params
    missing = [k for k in names if k not in record["params"]]
    if missing:
        raise BadInput(f"{path}: the fit lacks parameter(s) {', '.join(missing)}")
    return law


def _evaluate(law: str, params: dict, x: dict):
    if law in PARAM_NAMES:
        return predict_params(law, params, x["n"], x.get("d"))
    return lawforms.REGISTRY[law].predict(x, params)


def variables_of(law: str) -> tuple:
    if law in PARAM_NAMES:
        return ("n",) if law == "fixed_data" else ("n", "d")
    return lawforms.REGISTRY[law].variables


def range_warnings(record: dict, x: dict) -> list[str]:
    """One warning per variable outside the fitted range, saying by what factor."""
    out = []
    for var, (lo, hi) in (record.get("ranges") or {}).items():
        if var not in x or x[var] is None:
            continue
        v = float(x[var])
        if var == "s" and not lo <= v <= hi:  # a share in [0, 1): no ratio to report
            out.append(f"S = {v:.4g} is outside the fitted range [{lo:.4g}, {hi:.4g}]: "
                       "an extrapolation")
        elif var != "s" and (v > hi or v < lo):
            factor = v / hi if v > hi else lo / v
            side = "above the largest" if v > hi else "below the smallest"
            out.append(f"{VARIABLE_NAMES.get(var, var)} = {v:.4g} is {factor:.3g}x {side} "
                       f"fitted value ({hi if v > hi else lo:.4g}): an extrapolation")
    return out


def predict_from_record(record: dict, n: float | None, d: float | None = None, *,
                        e: float | None = None, g: float | None = None,
                        s: float | None = None, level: float | None = None,
                        path: str = "the fit file") -> dict:
    """{"loss", "interval", "level", "identified", "warnings", "range_warnings", ...} at
    N = ``n``, D = ``d`` and, for MoE laws, E = ``e`` experts, granularity G = ``g`` or
    sparsity S = ``s``."""
    law = check_record(record, path)
    x = {"n": n, "d": d, "e": e, "g": g, "s": s}
    for var in variables_of(law):
        value = x.get(var)
        ok = value is not None and (0 <= value < 1 if var == "s" else value > 0)
        if not ok:
            rule = "in [0, 1)" if var == "s" else "> 0"
            raise BadInput(f"the {law} law needs --{var} ({VARIABLE_NAMES[var]}) {rule}, "
                           f"got {value}")
    x = {k: float(x[k]) for k in variables_of(law)}
    loss = float(_evaluate(law, record["params"], x))
    boot = record.get("bootstrap") or {}
    level = float(level if level is not None else boot.get("level", 0.95))
    samples = boot.get("samples") or {}
    interval = None
    if samples and all(k in samples for k in record["params"]):
        arrays = {k: np.asarray(samples[k], dtype=float) for k in record["params"]}
        with np.errstate(all="ignore"):
            draws = np.asarray(_evaluate(law, arrays, x), dtype=float)
        draws = draws[np.isfinite(draws)]
        if len(draws) > 1:
            tail = 100 * (1 - level) / 2
            interval = [float(v) for v in np.percentile(draws, [tail, 100 - tail])]
    return {"loss": loss, "interval": interval, "level": level,
            "identified": bool(record.get("identified", True)),
            "warnings": list(record.get("warnings", [])),
            "range_warnings": range_warnings(record, x),
            "n_kind": record.get("n_kind", "unknown"), **x}


def optimize_from_record(record: dict, budget: allocate.Budget, *,
                         path: str = "the fit file") -> dict:
    """The optimal allocation under the fitted law for ``budget`` (its law's ``optimum``)."""
    law = check_record(record, path)
    if law == "fixed_data":
        raise BadInput(f"{path}: the fixed_data law L(N) has no tokens, so no allocation")
    form = lawforms.REGISTRY[law]
    if form.optimum is None:
        raise BadInput(f"{path}: the {law} law defines no optimal allocation")
    compute = record.get("compute")
    if isinstance(compute, dict) and "k" in compute:
        from dataclasses import replace
        budget = replace(budget, fpt=(float(compute["k"]), float(compute["v"])))
    out = form.optimum(record["params"], budget)
    checked = {"n": out.get("n_opt", out.get("n_active_opt")), "d": out.get("d_opt")}
    return {"law": law, **out, "identified": bool(record.get("identified", True)),
            "range_warnings": range_warnings(record, checked)}

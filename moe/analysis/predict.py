"""Predictions from a saved Approach-3 fit (fit.json), with bootstrap intervals when the fit
was bootstrapped (`moe fit --bootstrap K` stores the parameter samples)."""

from __future__ import annotations

import numpy as np

from moe.analysis.fit import PARAM_NAMES, predict_params


def predict_from_record(record: dict, n: float, d: float | None = None, *,
                        level: float | None = None) -> dict:
    """{"loss", "interval" ([lo, hi] or None), "level", "identified", "warnings", "n_kind"}."""
    if record.get("approach", 3) != 3 or "params" not in record:
        raise ValueError("moe predict needs an Approach-3 fit (moe fit --approach 3); "
                         "Approach 2 has no law to predict with")
    law = record.get("law", "chinchilla")
    if law not in PARAM_NAMES:
        raise ValueError(f"unknown law {law!r} in the fit file")
    params = record["params"]
    missing = [k for k in PARAM_NAMES[law] if k not in params]
    if missing:
        raise ValueError(f"the fit file lacks parameter(s) {', '.join(missing)}")
    if not n > 0:
        raise ValueError(f"--n must be > 0, got {n}")
    if law == "chinchilla" and (d is None or not d > 0):
        raise ValueError("the chinchilla law needs --d (tokens) > 0")
    loss = float(predict_params(law, params, n, d))
    boot = record.get("bootstrap") or {}
    level = float(level if level is not None else boot.get("level", 0.95))
    interval = None
    samples = boot.get("samples")
    if samples and all(k in samples for k in PARAM_NAMES[law]):
        arrays = {k: np.asarray(samples[k], dtype=float) for k in PARAM_NAMES[law]}
        with np.errstate(over="ignore", invalid="ignore"):
            draws = predict_params(law, arrays, n, d)
        draws = draws[np.isfinite(draws)]
        if len(draws) > 1:
            tail = 100 * (1 - level) / 2
            interval = [float(v) for v in np.percentile(draws, [tail, 100 - tail])]
    return {"loss": loss, "interval": interval, "level": level,
            "identified": bool(record.get("identified", True)),
            "warnings": list(record.get("warnings", [])),
            "n_kind": record.get("n_kind", "unknown"), "n": float(n),
            "d": None if d is None else float(d)}

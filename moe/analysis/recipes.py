"""Report sections for the training recipes (torch-free): checkpoint merging, curriculum x
schedule (with the EMA), regularised parameter scaling and ensemble scaling.

Input: a results table whose rows are trained runs (config columns `train.schedule`,
`data.order`, `train.weight_decay`, `data.unique_tokens`, `val_loss_ema`, ...) and recipe
outputs (`recipe` = "merge" | "ensemble", from `moe merge` / `moe ensemble`); a sweep
directory adds the result.json of every SWEEP_DIR/recipes/*/ (`moe.sweepdir.SweepDir.recipes`).

Every fitted or estimated quantity is a record with `estimate`, `interval` (a seeded
percentile bootstrap over runs), `identified` and `warnings`: `identified` is False when
the data cannot determine the quantity (too few runs or distinct x values, an interval
wider than the estimate), and the report states only identified quantities as findings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe.analysis import fit as fitmod
from moe.analysis.bootstrap import bootstrap_fit
from moe.sweepdir import SweepDir

RECIPE_COLUMNS = ("recipe", "data.order", "train.ema_decay", "data.unique_tokens",
                  "val_loss_ema")
SIZE_KEYS = ("d_model", "n_layers", "n_experts", "top_k", "tokens")


def has_recipe_columns(df: pd.DataFrame) -> bool:
    """True when some row used a recipe (a non-default recipe column)."""
    if "recipe" in df and df["recipe"].notna().any():
        return True
    if "data.order" in df and (df["data.order"].dropna() != "shuffled").any():
        return True
    for col in ("train.ema_decay", "data.unique_tokens"):
        if col in df and (pd.to_numeric(df[col], errors="coerce").fillna(0) > 0).any():
            return True
    return False


def with_recipe_outputs(df: pd.DataFrame, source) -> pd.DataFrame:
    """`df` plus the rows of SWEEP_DIR/recipes/*/result.json when `source` is a sweep dir."""
    if source is None or isinstance(source, pd.DataFrame) or not Path(source).is_dir():
        return df
    rows = [r for r in (d.read_result() for d in SweepDir(source).recipes())
            if isinstance(r, dict)]
    if not rows:
        return df
    extra = pd.DataFrame.from_records([{k: v for k, v in r.items()
                                        if not isinstance(v, (dict, list))} for r in rows])
    return pd.concat([df, extra], ignore_index=True)


def quantity(estimate: float, samples: np.ndarray | None, *, n: int, min_n: int = 2,
             level: float = 0.95, warnings: list[str] | None = None,
             difference: bool = False) -> dict[str, Any]:
    """An estimate with its percentile interval, `identified` and `warnings`.

    A fitted parameter whose interval is wider than twice its estimate is not identified.
    A `difference` (an effect) is identified by n >= min_n alone, and `resolved` says
    whether its interval excludes 0."""
    warns = list(warnings or [])
    interval = (float("nan"), float("nan"))
    ok = samples is not None and np.isfinite(samples).sum() >= 2
    if ok:
        tail = 50.0 * (1.0 - level)
        interval = tuple(float(x) for x in np.nanpercentile(samples, [tail, 100.0 - tail]))
    if n < min_n:
        warns.append(f"{n} run(s); need {min_n} for an interval")
    elif not ok:
        warns.append("no bootstrap interval")
    elif n < 5:
        warns.append(f"{n} runs: a percentile bootstrap over so few understates the spread")
    if ok and not difference and interval[1] - interval[0] > 2 * abs(estimate) > 0:
        warns.append("interval wider than twice the estimate")
    if ok and not difference and estimate > 0 and interval[0] <= 1e-6 * estimate:
        warns.append("interval reaches 0")
    identified = n >= min_n and ok and not any(w.startswith("interval") for w in warns)
    out = {"estimate": float(estimate), "interval": interval, "identified": bool(identified),
           "warnings": warns, "n": int(n)}
    if difference:
        out["resolved"] = bool(identified and (interval[0] > 0 or interval[1] < 0))
    return out


def _boot_mean(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray | None:
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    return x[rng.integers(0, len(x), (n_boot, len(x)))].mean(axis=1)


def _boot_diff(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> np.ndarray | None:
    """Bootstrap of mean(a) - mean(b), resampling each group."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, len(a), (n_boot, len(a)))].mean(axis=1)
    rb = b[rng.integers(0, len(b), (n_boot, len(b)))].mean(axis=1)
    return ra - rb


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, df.index)


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def _g(x, digits: int = 4) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _q(q: dict[str, Any]) -> str:
    """'estimate [lo, hi]' and a mark when not identified."""
    lo, hi = q["interval"]
    mark = "" if q["identified"] else " (not identified)"
    if q["identified"] and q.get("resolved") is False:
        mark = " (includes 0)"
    return f"{_g(q['estimate'])} [{_g(lo)}, {_g(hi)}]{mark}"


def _recipe(df: pd.DataFrame, name: str | None) -> pd.DataFrame:
    col = df["recipe"] if "recipe" in df else pd.Series(None, index=df.index, dtype=object)
    return df[col.isna()] if name is None else df[col == name]


# --------------------------------------------------------------------------- merging


def merge_effects(df: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Per decay shape: merged minus last-snapshot val loss and expert load, and merged minus
    the decayed baselines (same size and seed, schedule cosine or wsd)."""
    merged = _recipe(df, "merge")
    if merged.empty or "merge.decay" not in merged:
        return []
    base = _recipe(df, None)
    out = []
    for (decay, window), rows in merged.groupby(["merge.decay", "merge.window"], sort=True):
        d_loss = (_num(rows, "val_loss") - _num(rows, "last/val_loss")).dropna().to_numpy()
        d_load = (_num(rows, "expert_load_mean")
                  - _num(rows, "last/expert_load_mean")).dropna().to_numpy()
        rec = {"decay": decay, "n": len(rows), "window": int(window),
               "val_loss": float(_num(rows, "val_loss").mean()),
               "last_val_loss": float(_num(rows, "last/val_loss").mean()),
               "merged_minus_last": _mean_effect(d_loss, n_boot, seed),
               "load_merged_minus_last": _mean_effect(d_load, n_boot, seed)}
        for schedule in ("cosine", "wsd"):
            diffs = _paired_baseline(rows, base, schedule)
            rec[f"merged_minus_{schedule}"] = _mean_effect(diffs, n_boot, seed)
        out.append(rec)
    return out


def _mean_effect(x: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    return quantity(x.mean() if len(x) else np.nan, _boot_mean(x, n_boot, seed), n=len(x),
                    difference=True)


def _paired_baseline(merged: pd.DataFrame, base: pd.DataFrame, schedule: str) -> np.ndarray:
    """merged val_loss - val_loss of the base run with the same size and seed and `schedule`."""
    keys = [k for k in (*SIZE_KEYS, "train.seed") if k in merged and k in base]
    if "train.schedule" not in base or not keys:
        return np.zeros(0)
    ref = base[base["train.schedule"] == schedule].groupby(keys)["val_loss"].mean()
    diffs = []
    for _, row in merged.iterrows():
        key = tuple(row[k] for k in keys)
        key = key[0] if len(keys) == 1 else key
        if key in ref.index:
            diffs.append(float(row["val_loss"]) - float(ref.loc[key]))
    return np.asarray(diffs)


# --------------------------------------------------------------------------- curriculum


def curriculum_effects(df: pd.DataFrame, n_boot: int = 200, seed: int = 0
                       ) -> list[dict[str, Any]]:
    """Per schedule: mean val loss (raw and EMA) and task losses by order, and
    ascending-quality minus shuffled for each (the validation split holds noisy documents
    in the corpus's proportion; the task items are clean)."""
    base = _recipe(df, None)
    if "data.order" not in base or "train.schedule" not in base:
        return []
    out = []
    for schedule, rows in base.groupby(_schedule_label(base), sort=True):
        rec: dict[str, Any] = {"schedule": schedule}
        tasks = [c for c in rows if str(c).startswith("task/") and str(c).endswith("/loss")]
        for col in ("val_loss", "val_loss_ema", *tasks):
            groups = {o: _num(g, col).dropna().to_numpy() for o, g in rows.groupby("data.order")}
            cur, shuf = groups.get("ascending-quality"), groups.get("shuffled")
            if cur is None or shuf is None or not len(cur) or not len(shuf):
                continue
            rec[col] = {o: float(v.mean()) for o, v in groups.items() if len(v)}
            rec[f"{col}/curriculum_minus_shuffled"] = quantity(
                cur.mean() - shuf.mean(), _boot_diff(cur, shuf, n_boot, seed),
                n=min(len(cur), len(shuf)), difference=True)
        if len(rec) > 1:
            out.append(rec)
    return out


def _schedule_label(df: pd.DataFrame) -> pd.Series:
    """The schedule, with its final learning rate as a fraction of the peak when it decays."""
    frac = _num(df, "train.min_lr_frac").fillna(_num(df, "train.min_lr") / _num(df, "train.lr"))
    decays = df["train.schedule"] != "constant"
    label = df["train.schedule"].astype(str)
    return label.where(~decays | frac.isna(), label + " to " + frac.map(lambda f: f"{f:.3g}")
                       + " x peak")


# --------------------------------------------------------------------------- data-constrained


def regularised_scaling(df: pd.DataFrame, n_boot: int = 200, seed: int = 0
                        ) -> list[dict[str, Any]]:
    """Fixed-data law L(N) = E + A/N^alpha (moe.analysis.fit, law fixed_data) over the
    runs on a repeated unique-token budget: per weight decay, and over the best weight
    decay at each N (the regularised envelope)."""
    base = _recipe(df, None)
    if "data.unique_tokens" not in base:
        return []
    base = base[_num(base, "data.unique_tokens") > 0]
    if base.empty or "n_params_total" not in base:
        return []
    fits = []
    wd = _num(base, "train.weight_decay")
    for value in sorted(wd.dropna().unique()):
        fits.append(_fixed_data_fit(base[wd == value], f"weight_decay={value:g}", n_boot, seed))
    best = base.loc[base.groupby("n_params_total")["val_loss"].idxmin()]
    fits.append(_fixed_data_fit(best, "tuned weight decay (best per N)", n_boot, seed))
    return fits


def _fixed_data_fit(rows: pd.DataFrame, label: str, n_boot: int, seed: int) -> dict[str, Any]:
    n = _num(rows, "n_params_total").to_numpy()
    loss = _num(rows, "val_loss").to_numpy()
    ok = np.isfinite(n) & np.isfinite(loss) & (n > 0) & (loss > 0)
    n, loss = n[ok], loss[ok]
    rec: dict[str, Any] = {"label": label, "n_points": int(len(n)),
                           "n_sizes": int(len(np.unique(n)))}
    if rec["n_sizes"] < 3:
        rec["skipped"] = f"{rec['n_sizes']} model size(s); the law needs 3"
        return rec
    data = fitmod.FitData(n=n, d=None, loss=loss, columns={"n": "n_params_total",
                                                           "loss": "val_loss"})
    fit = fitmod.fit_data(data)
    boot = bootstrap_fit(fit, data, n_resamples=n_boot, seed=seed, n_workers=1) \
        if n_boot >= 2 and rec["n_sizes"] >= 4 else None
    warns = [] if rec["n_sizes"] >= 4 else [f"{rec['n_sizes']} sizes for 3 parameters: "
                                           "the fit interpolates, no interval"]
    for name, value in fit.params.items():
        samples = boot.samples.get(name) if boot else None
        rec[name] = quantity(value, samples, n=rec["n_sizes"], min_n=4, warnings=warns)
    rec["objective"] = fit.objective
    return rec


# --------------------------------------------------------------------------- ensembles


def ensemble_scaling(df: pd.DataFrame, n_boot: int = 200, seed: int = 0
                     ) -> list[dict[str, Any]]:
    """L(K) = L_inf + B/K by least squares on the ensembles of each model size."""
    ens = _recipe(df, "ensemble")
    if ens.empty or "ensemble.k" not in ens:
        return []
    keys = [k for k in SIZE_KEYS if k in ens]
    out = []
    for key, rows in ens.groupby(keys, sort=True):
        k = _num(rows, "ensemble.k").to_numpy()
        y = _num(rows, "val_loss").to_numpy()
        ok = np.isfinite(k) & np.isfinite(y) & (k >= 1)
        x, y = 1.0 / k[ok], y[ok]
        key = key if isinstance(key, tuple) else (key,)
        rec: dict[str, Any] = {"group": {c: _plain(v) for c, v in zip(keys, key, strict=True)},
                               "n_points": int(len(x)), "K": sorted(set(k[ok].astype(int)))}
        n_k = len(rec["K"])
        if n_k < 2:
            rec["skipped"] = f"{n_k} ensemble size(s); the law needs 2"
            out.append(rec)
            continue
        l_inf, b = _line(x, y)
        samples = _boot_line(x, y, n_boot, seed)
        warns = [] if n_k >= 3 else ["2 ensemble sizes for 2 parameters: no check of the form"]
        rec["L_inf"] = quantity(l_inf, samples[:, 0] if samples is not None else None,
                                n=n_k, min_n=3, warnings=warns)
        rec["B"] = quantity(b, samples[:, 1] if samples is not None else None, n=n_k,
                            min_n=3, warnings=warns)
        multi = rows[_num(rows, "ensemble.k") >= 2]
        for ref in ("members_mean", "members_best"):
            gap = (_num(multi, "val_loss") - _num(multi, f"val_loss_{ref}")).dropna().to_numpy()
            rec[f"minus_{ref}"] = _mean_effect(gap, n_boot, seed)
        out.append(rec)
    return out


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    b = float(np.cov(x, y, bias=True)[0, 1] / np.var(x))
    return float(y.mean() - b * x.mean()), b


def _boot_line(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> np.ndarray | None:
    if n_boot < 2 or len(x) < 3:
        return None
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        rows.append(_line(x[i], y[i]) if np.unique(x[i]).size >= 2 else (np.nan, np.nan))
    return np.asarray(rows)


# --------------------------------------------------------------------------- report


def recipe_findings(df: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Every recipe analysis of the table, JSON-ready."""
    return {"merge": merge_effects(df, n_boot, seed),
            "curriculum": curriculum_effects(df, n_boot, seed),
            "regularised_scaling": regularised_scaling(df, n_boot, seed),
            "ensemble_scaling": ensemble_scaling(df, n_boot, seed)}


def recipe_sections(df: pd.DataFrame, source=None, *, n_boot: int = 200,
                    seed: int = 0) -> list[str]:
    """Markdown sections of the recipes found in the table ([] when it has none)."""
    df = with_recipe_outputs(df, source)
    if not has_recipe_columns(df):
        return []
    f = recipe_findings(df, n_boot, seed)
    lines = ["## Training recipes", "",
             f"Intervals: {n_boot} bootstrap resamples over runs (seed {seed}), 95% percentile. "
             "A quantity marked *not identified* is not stated as a finding.", ""]
    lines += _merge_lines(f["merge"]) + _curriculum_lines(f["curriculum"])
    lines += _regularised_lines(f["regularised_scaling"]) + _ensemble_lines(f["ensemble_scaling"])
    return lines


def _merge_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = ["### Checkpoint merging (WSM) vs the last checkpoint", ""]
    if not rows:
        return out + ["No merged runs (`moe merge ... --out SWEEP_DIR/recipes/NAME`).", ""]
    out += ["| decay | n | window | merged val loss | last val loss | merged - last | "
            "load merged - last | merged - cosine run | merged - wsd run |",
            "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['decay']} | {r['n']} | {r['window']} | "
            f"{_g(r['val_loss'])} | {_g(r['last_val_loss'])} | {_q(r['merged_minus_last'])} | "
            f"{_q(r['load_merged_minus_last'])} | {_q(r['merged_minus_cosine'])} | "
            f"{_q(r['merged_minus_wsd'])} |" for r in rows]
    return out + ["", "Load = max/mean tokens per expert (1 = balanced), mean over layers.", ""]


def _curriculum_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = ["### Curriculum (ascending quality) x schedule", ""]
    if not rows:
        return out + ["No runs with both data.order values under one schedule.", ""]
    out += ["| schedule | loss (val: raw, EMA; or task) | shuffled | ascending-quality | "
            "curriculum - shuffled |",
            "|---|---|---|---|---|"]
    for r in rows:
        tasks = [(c, c.split("/")[1]) for c in r if c.startswith("task/") and c.count("/") == 2]
        for col, label in (("val_loss", "raw"), ("val_loss_ema", "EMA"), *tasks):
            if col in r:
                out.append(f"| {r['schedule']} | {label} | {_g(r[col].get('shuffled'))} | "
                           f"{_g(r[col].get('ascending-quality'))} | "
                           f"{_q(r[f'{col}/curriculum_minus_shuffled'])} |")
    return out + [""]


def _regularised_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = ["### Data-constrained parameter scaling L(N) = E + A/N^alpha", ""]
    if not rows:
        return out + ["No runs on a repeated unique-token budget (data.unique_tokens > 0).", ""]
    out += ["| runs | sizes | E | A | alpha |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['label']} | {r['n_sizes']} | skipped: {r['skipped']} | | |")
        else:
            out.append(f"| {r['label']} | {r['n_sizes']} | {_q(r['E'])} | {_q(r['A'])} | "
                       f"{_q(r['alpha'])} |")
    return out + [""]


def _ensemble_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = ["### Ensemble scaling L(K) = L_inf + B/K", ""]
    if not rows:
        return out + ["No ensembles (`moe ensemble ... --out SWEEP_DIR/recipes/NAME`).", ""]
    out += ["| model | K | L_inf | B | ensemble - members' mean (K >= 2) | ensemble - best "
            "member |", "|---|---|---|---|---|---|"]
    for r in rows:
        model = ", ".join(f"{k}={_g(v) if isinstance(v, float) else v}"
                          for k, v in r["group"].items())
        ks = ",".join(map(str, r["K"]))
        if "skipped" in r:
            out.append(f"| {model} | {ks} | skipped: {r['skipped']} | | | |")
        else:
            out.append(f"| {model} | {ks} | {_q(r['L_inf'])} | {_q(r['B'])} | "
                       f"{_q(r['minus_members_mean'])} | {_q(r['minus_members_best'])} |")
    return out + [""]

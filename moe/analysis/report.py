"""A Markdown report from a results table: fits, optima and figures, every number computed
from the data. Tolerant of tables lacking columns: what can't be computed is skipped with
the reason written into the report."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from moe.analysis import findings as findmod
from moe.analysis import fit as fitmod
from moe.analysis import plots, recipes, records, sparsity
from moe.analysis.columns import Columns, describe_missing, ensure_canonical
from moe.analysis.tables import (
    PRETRAIN_LOSS,
    TableError,
    finite_rows,
    read_table,
)
from moe.io import atomic_write_text, check_output_dir
from moe.procs import affinity_cores, fork_usable

NOT_A_FINDING = "its numbers are not findings and are not shown (see `moe fit` for diagnostics)"


def _g(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def not_identified(verdict, what: str) -> list[str]:
    """The report's only way to mention a non-identified quantity: its reasons, no numbers."""
    out = [f"**{what}: not identified: {verdict.reason}.** {NOT_A_FINDING[0].upper()}"
           f"{NOT_A_FINDING[1:]}.", ""]
    extra = [w for w in verdict.warnings if w not in verdict.reasons]
    return out + ([f"- warning: {w}" for w in extra] + [""] if extra else [])


def _warnings(verdict) -> list[str]:
    return [f"- warning: {w}" for w in verdict.warnings] + ([""] if verdict.warnings else [])


def _param_table(fit: fitmod.LawFit, boot) -> list[str]:
    names = list(fit.params) + (["a", "b", "tpp_opt"] if fit.law == "chinchilla" else [])
    values = {**fit.params, "a": fit.a, "b": fit.b, "tpp_opt": fit.tpp_opt}
    level = f"{100 * boot.level:.0f}% interval" if boot else "interval"
    lines = [f"| quantity | estimate | bootstrap SE | {level} |", "|---|---|---|---|"]
    for name in names:
        se = _g(boot.se.get(name)) if boot else "-"
        iv = boot.intervals.get(name) if boot else None
        ivs = f"[{_g(iv[0])}, {_g(iv[1])}]" if iv else "-"
        lines.append(f"| {name} | {_g(values[name])} | {se} | {ivs} |")
    return lines


def _missing(df: pd.DataFrame, need: list[str]) -> list[str]:
    return [c for c in need if c not in df]


def _fit_and_check(data: fitmod.FitData, n_boot: int, seed: int):
    """(fit with its final verdict, bootstrap or None) under the one policy of `moe fit`
    (:func:`moe.analysis.records.approach3`)."""
    return records.approach3(data, n_boot=n_boot, seed=seed)


def _law_section(df: pd.DataFrame, n_boot: int, seed: int,
                 rec: dict) -> tuple[list[str], object]:
    """Approach-3 fits; returns (lines, the chinchilla fit if identified, else None)."""
    out = ["## Pre-training loss laws (Approach 3)", ""]
    need = ["n_params_total", "tokens", PRETRAIN_LOSS]
    if _missing(df, need):
        return out + [f"Skipped: missing column(s) {describe_missing(df, _missing(df, need))}.",
                      ""], None
    rows = finite_rows(df, need)
    if len(rows) < 5:
        return out + [f"Skipped: {len(rows)} rows with valid N, D and loss; need 5.", ""], None
    if len(rows) < len(df):
        out += [f"{len(df) - len(rows)} row(s) without valid N, D or loss were dropped.", ""]
    data = fitmod.prepare(rows, n_col="n_params_total", d_col="tokens", loss_col=PRETRAIN_LOSS,
                          flops_col="flops" if "flops" in rows else None)
    chin, boot = _fit_and_check(data, n_boot, seed)
    rec["approach3"] = _law_record(chin, boot)
    out += ["Fit: sum of Huber(delta=1e-3) of log-loss residuals, LSE parameterisation, "
            "global search then L-BFGS-B (Hoffmann et al. 2022; Besiroglu et al. 2024). "
            f"N = {describe_missing(df, ['n_params_total'])} ({chin.n_kind} parameters), "
            f"D = {describe_missing(df, ['tokens'])}, loss = "
            f"{describe_missing(df, [PRETRAIN_LOSS])}; {chin.n_points} points. Compute: "
            f"{chin.compute_note}.", ""]
    if not chin.verdict.identified:
        out += not_identified(chin.verdict, "L(N, D) = E + A/N^alpha + B/D^beta")
        out += _fixed_data_law(data, n_boot, seed, rec) if fitmod.is_fixed_tpp(data) else []
        return out + _leave_out(data) + _active_fit(rows, rec), None
    out += [f"Identified. Bootstrap: {n_boot} resamples, seed {seed}; tpp_opt is the "
            f"compute-optimal D/N at C = {_g(chin.flops_ref)} FLOPs (the largest in the data)."
            if boot else "Identified (no bootstrap).", ""]
    out += _param_table(chin, boot) + [""] + _warnings(chin.verdict)
    out += _allocation(chin, data)
    return out + _leave_out(data) + _active_fit(rows, rec), chin


def _allocation(chin: fitmod.LawFit, data: fitmod.FitData) -> list[str]:
    budgets = np.array([chin.flops_ref / 100, chin.flops_ref, chin.flops_ref * 100])
    n_opt, d_opt = chin.allocation(budgets)
    lo, hi = float(data.n.min()), float(data.n.max())
    out = [f"Compute-optimal allocation (C = FLOPs per token(N) x D; {chin.compute_note}):",
           "", "| C (FLOPs) | N_opt | D_opt | N_opt inside the sampled N |", "|---|---|---|---|"]
    out += [f"| {_g(c)} | {_g(n)} | {_g(d)} | {'yes' if lo <= n <= hi else 'no (extrapolated)'} |"
            for c, n, d in zip(budgets, n_opt, d_opt, strict=True)]
    return out + [""]


def _fixed_data_law(data: fitmod.FitData, n_boot: int, seed: int, rec: dict) -> list[str]:
    tpp = float(np.exp(np.mean(np.log(data.d / data.n))))
    out = [f"Every run has the same tokens per parameter (D/N = {_g(tpp, 3)}), so the data "
           "constrain only the fixed-TPP law L(N) = E + A/N^alpha:", ""]
    fixed, boot = _fit_and_check(dataclass_without_d(data), n_boot, seed)
    rec["fixed_data"] = _law_record(fixed, boot)
    title = "Fixed-TPP law L(N) = E + A/N^alpha"
    if not fixed.verdict.identified:
        return out + not_identified(fixed.verdict, title)
    out += [f"### {title} (objective {_g(fixed.objective)}"
            + (f", {n_boot} bootstrap resamples, seed {seed})" if boot else ")"), ""]
    return out + _param_table(fixed, boot) + [""] + _warnings(fixed.verdict)


def dataclass_without_d(data: fitmod.FitData) -> fitmod.FitData:
    """The same points for the fixed-data law (D dropped)."""
    return fitmod.FitData(n=data.n, d=None, loss=data.loss, columns=data.columns)


def _leave_out(data: fitmod.FitData) -> list[str]:
    try:
        lo = fitmod.leave_out_largest(data)
    except TableError as exc:
        return [f"Leave-out validation skipped: {exc}.", ""]
    caveat = ("" if lo.fit.verdict.identified else
              f" (the law fitted to the smaller models is not identified: {lo.fit.verdict.reason};"
              " the error measures interpolation, not a law)")
    return [f"Leave-out validation: fitted on the {lo.n_train} points below N = "
            f"{_g(lo.n_holdout)}, the fit predicts the {lo.n_test} point(s) at that size with "
            f"mean |relative error| {100 * lo.mean_abs_rel_error:.2f}% (max "
            f"{100 * lo.max_abs_rel_error:.2f}%){caveat}.", ""]


def _active_fit(rows: pd.DataFrame, rec: dict) -> list[str]:
    if "n_params_active" not in rows or len(finite_rows(rows, ["n_params_active"])) < 5:
        return []
    sub = finite_rows(rows, ["n_params_active"])
    fit = fitmod.fit_table(sub, n_col="n_params_active", d_col="tokens",
                           loss_col=PRETRAIN_LOSS, flops_col="flops" if "flops" in sub else None)
    rec["approach3_active"] = _law_record(fit, None)
    if not fit.verdict.identified:
        return not_identified(fit.verdict, "L(N, D) with N = active parameters")
    p = fit.params
    return ["With N = active parameters instead (point fit, identified): "
            f"E = {_g(p['E'])}, A = {_g(p['A'])}, B = {_g(p['B'])}, alpha = {_g(p['alpha'])}, "
            f"beta = {_g(p['beta'])}, objective {_g(fit.objective)}.", ""] + _warnings(
                fit.verdict)


def _isoflop_section(df: pd.DataFrame, chin, n_boot: int, seed: int, rec: dict) -> list[str]:
    out = ["## IsoFLOP profiles (Approach 2)", ""]
    need = ["n_params_total", "flops", PRETRAIN_LOSS]
    if _missing(df, need):
        return out + [f"Skipped: missing column(s) {describe_missing(df, _missing(df, need))}.",
                      ""]
    rows = finite_rows(df, need)
    tokens = rows["tokens"] if "tokens" in rows and rows["tokens"].notna().all() else None
    res = records.approach2(rows["n_params_total"], rows[PRETRAIN_LOSS], rows["flops"],
                            tokens=tokens, n_boot=n_boot, seed=seed)
    rec["approach2"] = res.to_dict()
    if not res.budgets:
        return out + ["Skipped: no compute budget has >= 3 model sizes (a fixed-TPP sweep has "
                      "one run per budget).", ""]
    out += ["| C (FLOPs) | runs | in window | N_opt | D_opt | interior |",
            "|---|---|---|---|---|---|"]
    out += [f"| {_g(b.flops)} | {b.n_points} | {b.n_used} | "
            + (f"{_g(b.n_opt)} | {_g(b.d_opt)} | yes |" if b.interior else
               f"- | - | no: {b.reason} |") for b in res.budgets] + [""]
    bias = res.bias
    out += [f"**Bias:** {res.note} Each parabola is fitted on window {res.window.label}. On "
            f"this table's (N, C) grid, noiseless data from {bias['law']} (a = "
            f"{_g(bias['a_true'])}) give a = {_g(bias['a_approach2'])} by Approach 2 "
            f"(bias {_g(bias['bias'], 2)}).", ""]
    if not res.verdict.identified:
        return out + not_identified(res.verdict, "Approach-2 exponents a, b")
    ivs = "".join(f", 95% interval [{_g(res.intervals[k][0])}, {_g(res.intervals[k][1])}] for "
                  f"{k}" for k in ("a", "b") if k in res.intervals)
    out += [f"{len(res.interior)} interior budgets: N_opt = {_g(res.n_prefactor)} C^{_g(res.a)},"
            f" D_opt = {_g(res.d_prefactor)} C^{_g(res.b)}{ivs}."]
    return out + [""] + _warnings(res.verdict)


WHICH_LAWS = ("chinchilla", "chinchilla-tied", "kaplan")


def _which_law_section(df: pd.DataFrame, n_boot: int, seed: int, rec: dict) -> list[str]:
    """Law choice by held-out error (`moe fit --compare` with its default split): the rows
    within a factor of 2 of the largest compute are held out; the fit rows alone choose."""
    out = ["## Which law", ""]
    need = ["n_params_total", "tokens", PRETRAIN_LOSS]
    if _missing(df, need):
        return out + [f"Skipped: missing column(s) {describe_missing(df, _missing(df, need))}.",
                      ""]
    try:
        cmp, _ = records.compare_record(finite_rows(df, need), None, WHICH_LAWS,
                                        Columns(loss=PRETRAIN_LOSS), n_boot=n_boot, seed=seed)
    except (TableError, ValueError) as exc:
        return out + [f"Skipped: {exc}", ""]
    rec["which_law"] = cmp
    out += [f"Each law fitted on {cmp['n_train']} runs and scored on the {cmp['n_test']} "
            "held out (compute within 2x of the largest); mean |relative error| of the "
            "predicted loss, 95% interval over the bootstrap fits:", "",
            "| law | held-out error | interval | identified |", "|---|---|---|---|"]
    for r in cmp["compare"]["laws"]:
        iv = r["interval"]
        shown = f"[{_g(100 * iv[0], 3)}%, {_g(100 * iv[1], 3)}%]" if iv else "-"
        out.append(f"| {r['law']} | {_g(100 * r['held_out_mean_abs_rel_error'], 3)}% | {shown} "
                   f"| {'yes' if r['identified'] else 'no: ' + r['reason']} |")
    chosen = cmp["compare"]["chosen"]
    return out + ["", f"Chosen: **{chosen}** (the lowest held-out error among "
                  f"{cmp['compare']['chosen_among']}). MoE laws (clark-routed, "
                  "ludziejewski-joint, krajewski-granularity) need their own columns: compare "
                  "them with `moe fit --compare ...`.", ""]


def _sparsity_section(df: pd.DataFrame, n_boot: int, seed: int, rec: dict) -> list[str]:
    out = ["## Sparsity and downstream tasks", ""]
    long = sparsity.long_table(df, "loss")
    if long.empty:
        return out + ["Skipped: the table has no task loss columns (task/<name>/loss, or name "
                      "them with --task-col NAME=COLUMN[:KIND]).", ""]
    kinds = long.groupby("task")["kind"].first()
    out += ["Tasks: " + ", ".join(f"{t} ({k})" for t, k in kinds.items()) + ".", "",
            "Each fitted quantity is either identified (shown) or marked `not identified` "
            "with its reason; the latter are not findings.", ""]
    grouped, by = sparsity.width_groups(long)
    rows, skipped = sparsity.ushape_by_group(grouped, by=by, n_boot=n_boot, seed=seed)
    rec["ushape_sparsity"] = [_ushape_record(r, by) for r in rows]
    if rows:
        out += ["U-shape fit of task loss in sparsity at fixed width"
                + (" and token budget" if by != "d_model" else "") + " (quadratic; optimum "
                f"s* = -c1/(2 c2); {n_boot} bootstrap resamples):", "",
                f"| task | kind | {by} | s* | 95% interval | convex share |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['task']} | {r['kind']} | {r[by]} | " + _ushape_cells(r["fit"])
                for r in rows] + [""]
    out += [f"- {s}" for s in skipped] + ([""] if skipped else [])
    out += _tpp_and_active(long, n_boot, seed, rec)
    slopes = sparsity.pretrain_slopes(long)
    rec["slopes"] = slopes.to_dict("records")
    if not slopes.empty:
        out += ["Slope of task loss on pre-training loss, per sparsity (OLS; 95% interval "
                "+- 1.96 SE):", "", "| task | kind | sparsity | slope | SE | n |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r.task} | {r.kind} | {r.sparsity:.3g} | "
                + (f"{r.slope:.3g} | {r.se:.2g} |" if r.identified else
                   f"not identified: {r.reason} | - |") + f" {r.n} |"
                for r in slopes.itertuples()] + [""]
    effect = sparsity.topk_effect(long)
    rec["topk_effect"] = effect.to_dict("records")
    if not effect.empty:
        out += ["Effect of top-k at equal pre-training loss (OLS with pre-training loss as "
                "covariate; negative = lower task loss than the reference k):", "",
                "| task | kind | k | vs k | effect | SE | n |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r.task} | {r.kind} | {r.top_k} | {r.reference_k} | "
                + (f"{r.effect:.3g} | {r.se:.2g} |" if r.identified else
                   f"not identified: {r.reason} | - |") + f" {r.n} |"
                for r in effect.itertuples()] + [""]
    return out


def _ushape_cells(f, transform=None) -> str:
    """'s* | interval | convex share |' cells, or 'not identified: reason' in place of s*."""
    t = transform or (lambda v: v)
    if not f.verdict.identified:
        return f"not identified: {f.verdict.reason} | - | {f.convex_fraction:.2f} |"
    return (f"{_g(t(f.optimum), 3)} | [{_g(t(f.interval[0]), 3)}, {_g(t(f.interval[1]), 3)}] | "
            f"{f.convex_fraction:.2f} |")


def _tpp_and_active(long: pd.DataFrame, n_boot: int, seed: int, rec: dict) -> list[str]:
    """U-shape in log TPP per task (if TPP varies) and task loss vs sparsity at fixed active
    parameters (groups with >= 2 sparsities)."""
    out = []
    if "tpp" in long and long["tpp"].nunique() >= 3:
        rows, _ = sparsity.ushape_by_group(long, by=None, x="log_tpp", n_boot=n_boot, seed=seed)
        rec["ushape_log_tpp"] = [_ushape_record(r, None) for r in rows]
        out += ["U-shape fit of task loss in log TPP (all runs per task; optimum as TPP):", "",
                "| task | kind | TPP* | 95% interval | convex share |", "|---|---|---|---|---|"]
        out += [f"| {r['task']} | {r['kind']} | " + _ushape_cells(r["fit"], np.exp)
                for r in rows] + [""]
    else:
        out += ["U-shape in TPP not fitted: fewer than 3 distinct TPP values.", ""]
    table = sparsity.loss_vs_sparsity(long, by="n_params_active")
    if table.empty:
        return out
    multi = table.groupby(["task", "n_params_active"])["sparsity"].transform("nunique") >= 2
    if not multi.any():
        return out + ["No active-parameter group has runs at 2 or more sparsities.", ""]
    out += ["Mean task loss vs sparsity at fixed active parameters (groups with >= 2 "
            "sparsities; observed means, not fits):", "",
            "| task | active params | sparsity | mean task loss | n |", "|---|---|---|---|---|"]
    out += [f"| {r.task} | {_g(r.n_params_active, 2)} | {r.sparsity:.3g} | {r.mean:.4g} | "
            f"{r.n} |" for r in table[multi].itertuples()]
    return out + [""]


def make_report(table_or_sweep_dir, out_md, fig_dir=None, *, n_boot: int = 200,
                seed: int = 0, source: str | None = None, n_label: str | None = None,
                force: bool = False) -> Path:
    """Write report.md (atomically) with the paper's findings first, then fits, optima and
    figures; report.json with every fitted object's record (``identified``, ``warnings``,
    estimates); and findings.json beside them (:mod:`moe.analysis.findings`). Returns the
    .md path.

    A DataFrame that went through :meth:`Columns.canonical` keeps its column mapping;
    anything else is read with the default mapping. Raises TableError when neither a
    section nor a figure can be made. A figure directory holding other files than figures
    is refused before any work unless ``force`` (:func:`plots.claim_figure_dir`).
    """
    out_md = Path(out_md)
    fig_dir = Path(fig_dir) if fig_dir is not None else out_md.parent / "figures"
    check_output_dir(fig_dir, "plot", force=force, own_names=plots.FIGURE_FILES)
    if isinstance(table_or_sweep_dir, pd.DataFrame):
        df, shown = ensure_canonical(table_or_sweep_dir), source or "(DataFrame)"
    else:
        df = ensure_canonical(read_table(table_or_sweep_dir))
        shown = source or str(table_or_sweep_dir)
    lines = ["# Scaling and sparsity report", "", f"Source: `{shown}`; {len(df)} runs.", ""]
    missing = df.attrs.get("missing", [])
    if missing:
        lines += [f"Columns not in the table: {describe_missing(df, missing)}.", ""]
    which_law = beside(_which_law_part, df, n_boot, seed)
    found, optima = findmod.findings_and_optima(df, n_boot=n_boot, seed=seed)
    lines += findmod.findings_section(found, optima)
    rec: dict = {"sparsity_optima": [o.to_dict() for o in optima]}
    law_lines, chin = _law_section(df, n_boot, seed, rec)
    isoflop_lines = _isoflop_section(df, chin, n_boot, seed, rec)
    sparsity_lines = _sparsity_section(df, n_boot, seed, rec)
    recipe_lines = recipes.recipe_sections(df, table_or_sweep_dir, n_boot=n_boot, seed=seed)
    figs = _save_figures(df, fig_dir, chin, found, force)
    which_lines, which_rec = which_law()
    rec.update(which_rec)
    sections = [law_lines, isoflop_lines, which_lines, sparsity_lines]
    if recipe_lines:  # only tables of recipe sweeps have them
        sections.append(recipe_lines)
    made = [sec for sec in sections if not any(x.startswith("Skipped:") for x in sec)]
    if not made and not figs.paths:
        reasons = [next(x for x in sec if x.startswith("Skipped:")) for sec in sections]
        raise TableError("nothing could be made from this table: " + " ".join(reasons))
    for sec in sections:
        lines += sec
    lines += ["## Figures", ""]
    for name, paths in figs.paths.items():
        rel = os.path.relpath(paths[0], out_md.parent)
        lines.append(f"![{name}]({rel}) ([pdf]({os.path.relpath(paths[1], out_md.parent)}))")
    lines += [""] + [f"- {name} skipped: {why}" for name, why in figs.skipped.items()]
    atomic_write_text(out_md.parent / "findings.json", json.dumps(
        _clean([f.to_dict() for f in found]), indent=1, allow_nan=False) + "\n")
    atomic_write_text(out_md.with_suffix(".json"),
                      json.dumps(_clean(rec), indent=1, allow_nan=False) + "\n")
    return atomic_write_text(out_md, "\n".join(lines).rstrip() + "\n")


def beside(fn: Callable, *args, **kwargs) -> Callable[[], object]:
    """Start fn(*args, **kwargs) in a forked process beside this one; returns the wait for
    its result.

    The report's sections and figures are pure functions of the table, so independent ones
    (the law comparison, half of the figures: together about half of the report's time on
    the demo's table) run on a second core while this process fits and draws the rest: the
    same result, sooner. Inline where fork is unavailable (not POSIX, or this is a daemonic
    process) or only one core is usable.
    """
    if not fork_usable() or affinity_cores() < 2:
        result = fn(*args, **kwargs)
        return lambda: result
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    future = pool.submit(fn, *args, **kwargs)

    def wait():
        try:
            return future.result()
        finally:
            pool.shutdown()
    return wait


def _save_figures(df: pd.DataFrame, fig_dir: Path, chin, found: list,
                  force: bool) -> plots.FigureSet:
    """Every figure, every other one drawn in a forked process beside this one (`beside`)."""
    plots.claim_figure_dir(fig_dir, force=force)
    names = list(plots.FIGURES)
    other = beside(plots.save_figures, df, fig_dir, fit=chin, found=found, names=names[1::2],
                   claimed=True)
    mine = plots.save_figures(df, fig_dir, fit=chin, found=found, names=names[::2],
                              claimed=True)
    return plots.merge_figure_sets(mine, other())


def _which_law_part(df: pd.DataFrame, n_boot: int, seed: int) -> tuple[list[str], dict]:
    rec: dict = {}
    return _which_law_section(df, n_boot, seed, rec), rec


def _law_record(fit: fitmod.LawFit, boot) -> dict:
    out = fit.to_dict()
    if boot is not None:
        out["intervals"] = {k: list(v) for k, v in boot.intervals.items()}
    return out


def _ushape_record(row: dict, by: str | None) -> dict:
    f = row["fit"]
    return {"task": row["task"], "kind": row["kind"],
            **({"group": str(by), "value": row[by]} if by else {}), "x": f.x_name,
            "optimum": f.optimum, "interval": list(f.interval), "interior": f.interior,
            "convex_share": f.convex_fraction, **f.verdict.to_dict()}


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x

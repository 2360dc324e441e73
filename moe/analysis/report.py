"""A Markdown report from a results table: fits, optima and figures, every number computed
from the data. Tolerant of tables lacking columns: what can't be computed is skipped with
the reason written into the report."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from moe.analysis import fit as fitmod
from moe.analysis import isoflop, plots, recipes, sparsity
from moe.analysis.bootstrap import bootstrap_fit
from moe.analysis.tables import (
    PRETRAIN_LOSS,
    TableError,
    atomic_write_text,
    finite_rows,
    read_table,
    with_pretrain_loss,
)


def _g(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


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


def _law_section(df: pd.DataFrame, n_boot: int, seed: int) -> tuple[list[str], object]:
    """Approach-3 fits; returns (lines, the chinchilla fit or None)."""
    out = ["## Pre-training loss laws (Approach 3)", ""]
    need = ["n_params_total", "tokens", PRETRAIN_LOSS]
    if any(c not in df for c in need):
        return out + [f"Skipped: the table lacks {', '.join(c for c in need if c not in df)}.",
                      ""], None
    rows = finite_rows(df, need)
    if len(rows) < 5:
        return out + [f"Skipped: {len(rows)} rows with valid N, D and loss; need 5.", ""], None
    if len(rows) < len(df):
        out += [f"{len(df) - len(rows)} row(s) without valid N, D or loss were left out.", ""]
    data = fitmod.prepare(rows, n_col="n_params_total", d_col="tokens", loss_col=PRETRAIN_LOSS)
    chin = fitmod.fit_data(data)
    out += ["Fit: sum of Huber(delta=1e-3) of log-loss residuals, LSE parameterisation, "
            "global search then L-BFGS-B (Hoffmann et al. 2022; Besiroglu et al. 2024). "
            f"N = total parameters, D = tokens, loss = pre-training loss; {chin.n_points} "
            f"points; objective {_g(chin.objective)}.", ""]
    if fitmod.is_fixed_tpp(data):
        tpp = float(np.exp(np.mean(np.log(data.d / data.n))))
        out += [f"**Note:** every run has the same tokens per parameter (D/N = {_g(tpp, 3)}), "
                "so A/N^alpha and B/D^beta cannot be told apart and L(N, D) is not "
                "identifiable from this table: its point fit is shown without intervals and "
                "should not be used for allocation. The fixed-TPP law L(N) = E + A/N^alpha "
                "below is what the data constrain.", ""]
        out += _param_table(chin, None) + [""]
        fixed = fitmod.fit_data(fitmod.FitData(n=data.n, d=None, loss=data.loss,
                                               columns=data.columns))
        boot = bootstrap_fit(fixed, dataclass_without_d(data), n_resamples=n_boot, seed=seed)
        out += [f"### Fixed-TPP law L(N) = E + A/N^alpha (objective {_g(fixed.objective)}, "
                f"{n_boot} bootstrap resamples, seed {seed})", ""]
        out += _param_table(fixed, boot) + [""]
        return out + _leave_out(data) + _active_fit(rows), chin
    boot = bootstrap_fit(chin, data, n_resamples=n_boot, seed=seed) if n_boot >= 2 else None
    out += [f"Bootstrap: {n_boot} resamples, seed {seed}; tpp_opt is the compute-optimal "
            f"D/N at C = {_g(chin.flops_ref)} FLOPs (the largest 6ND in the data).", ""]
    out += _param_table(chin, boot) + [""]
    budgets = np.array([chin.flops_ref / 100, chin.flops_ref, chin.flops_ref * 100])
    n_opt, d_opt = chin.allocation(budgets)
    out += ["Compute-optimal allocation (C = 6ND):", "", "| C (FLOPs) | N_opt | D_opt |",
            "|---|---|---|"]
    out += [f"| {_g(c)} | {_g(n)} | {_g(d)} |"
            for c, n, d in zip(budgets, n_opt, d_opt, strict=True)]
    return out + [""] + _leave_out(data) + _active_fit(rows), chin


def dataclass_without_d(data: fitmod.FitData) -> fitmod.FitData:
    """The same points for the fixed-data law (D dropped)."""
    return fitmod.FitData(n=data.n, d=None, loss=data.loss, columns=data.columns)


def _leave_out(data: fitmod.FitData) -> list[str]:
    try:
        lo = fitmod.leave_out_largest(data)
    except TableError as exc:
        return [f"Leave-out validation skipped: {exc}.", ""]
    return [f"Leave-out validation: fitted on the {lo.n_train} points below N = "
            f"{_g(lo.n_holdout)}, the law predicts the {lo.n_test} point(s) at that size with "
            f"mean |relative error| {100 * lo.mean_abs_rel_error:.2f}% (max "
            f"{100 * lo.max_abs_rel_error:.2f}%).", ""]


def _active_fit(rows: pd.DataFrame) -> list[str]:
    if "n_params_active" not in rows or len(finite_rows(rows, ["n_params_active"])) < 5:
        return []
    sub = finite_rows(rows, ["n_params_active"])
    fit = fitmod.fit_table(sub, n_col="n_params_active", d_col="tokens",
                           loss_col=PRETRAIN_LOSS)
    p = fit.params
    return ["With N = active parameters instead (point fit): "
            f"E = {_g(p['E'])}, A = {_g(p['A'])}, B = {_g(p['B'])}, alpha = {_g(p['alpha'])}, "
            f"beta = {_g(p['beta'])}, objective {_g(fit.objective)}.", ""]


def _isoflop_section(df: pd.DataFrame, chin) -> list[str]:
    out = ["## IsoFLOP profiles (Approach 2)", ""]
    need = ["n_params_total", "flops", PRETRAIN_LOSS]
    if any(c not in df for c in need):
        return out + ["Skipped: the table lacks n_params_total, flops or a loss.", ""]
    rows = finite_rows(df, need)
    res = isoflop.fit_isoflop(rows["n_params_total"], rows[PRETRAIN_LOSS], rows["flops"])
    if len(res.budgets) < 2:
        return out + [f"Skipped: {len(res.budgets)} compute budget(s) with >= 3 model sizes "
                      "and a convex profile; Approach 2 needs 2.", ""]
    out += [f"{len(res.budgets)} budgets: N_opt ~ C^{_g(res.a)}, D_opt ~ C^{_g(res.b)}.",
            "", f"**Bias:** {res.note}"]
    if chin is not None:
        bias = isoflop.parabola_bias(rows["n_params_total"], rows["flops"], chin.params)
        out += [f" On this table's (N, C) grid, noiseless data from the Approach-3 law "
                f"(a = {_g(bias['a_true'])}) give a = {_g(bias['a_approach2'])} by Approach 2 "
                f"(bias {_g(bias['bias'], 2)})."]
    return out + [""]


def _sparsity_section(df: pd.DataFrame, n_boot: int, seed: int) -> list[str]:
    out = ["## Sparsity and downstream tasks", ""]
    long = sparsity.long_table(df, "loss")
    if long.empty:
        return out + ["Skipped: the table has no task/<name>/loss columns.", ""]
    kinds = long.groupby("task")["kind"].first()
    out += ["Tasks: " + ", ".join(f"{t} ({k})" for t, k in kinds.items()) + ".", ""]
    grouped, by = sparsity.width_groups(long)
    rows, skipped = sparsity.ushape_by_group(grouped, by=by, n_boot=n_boot, seed=seed)
    if rows:
        out += ["U-shape fit of task loss in sparsity at fixed width"
                + (" and token budget" if by != "d_model" else "") + " (quadratic; optimum "
                f"s* = -c1/(2 c2); {n_boot} bootstrap resamples):", "",
                f"| task | kind | {by} | s* | 95% interval | convex share | interior |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            f = r["fit"]
            out.append(f"| {r['task']} | {r['kind']} | {r[by]} | {_g(f.optimum, 3)} |"
                       f" [{_g(f.interval[0], 3)}, {_g(f.interval[1], 3)}] | "
                       f"{f.convex_fraction:.2f} | {'yes' if f.interior else 'no'} |")
        out.append("")
    out += [f"- {s}" for s in skipped] + ([""] if skipped else [])
    out += _tpp_and_active(long, n_boot, seed)
    slopes = sparsity.pretrain_slopes(long)
    if not slopes.empty:
        out += ["Slope of task loss on pre-training loss, per sparsity:", "",
                "| task | kind | sparsity | slope | n |", "|---|---|---|---|---|"]
        out += [f"| {r.task} | {r.kind} | {r.sparsity:.3g} | {r.slope:.3g} | {r.n} |"
                for r in slopes.itertuples()] + [""]
    effect = sparsity.topk_effect(long)
    if not effect.empty:
        out += ["Effect of top-k at equal pre-training loss (OLS with pre-training loss as "
                "covariate; negative = lower task loss than the reference k):", "",
                "| task | kind | k | vs k | effect | SE | n |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r.task} | {r.kind} | {r.top_k} | {r.reference_k} | {r.effect:.3g} | "
                f"{r.se:.2g} | {r.n} |" for r in effect.itertuples()] + [""]
    return out


def _tpp_and_active(long: pd.DataFrame, n_boot: int, seed: int) -> list[str]:
    """U-shape in log TPP per task (if TPP varies) and task loss vs sparsity at fixed active
    parameters (groups with >= 2 sparsities)."""
    out = []
    if "tpp" in long and long["tpp"].nunique() >= 3:
        rows, _ = sparsity.ushape_by_group(long, by=None, x="log_tpp", n_boot=n_boot, seed=seed)
        out += ["U-shape fit of task loss in log TPP (all runs per task; optimum as TPP):", "",
                "| task | kind | TPP* | 95% interval | convex share |", "|---|---|---|---|---|"]
        out += [f"| {r['task']} | {r['kind']} | {_g(np.exp(r['fit'].optimum), 3)} | "
                f"[{_g(np.exp(r['fit'].interval[0]), 3)}, {_g(np.exp(r['fit'].interval[1]), 3)}]"
                f" | {r['fit'].convex_fraction:.2f} |" for r in rows] + [""]
    else:
        out += ["U-shape in TPP not fitted: fewer than 3 distinct TPP values.", ""]
    table = sparsity.loss_vs_sparsity(long, by="n_params_active")
    if table.empty:
        return out
    multi = table.groupby(["task", "n_params_active"])["sparsity"].transform("nunique") >= 2
    if not multi.any():
        return out + ["No active-parameter group has runs at 2 or more sparsities.", ""]
    out += ["Mean task loss vs sparsity at fixed active parameters (groups with >= 2 "
            "sparsities):", "", "| task | active params | sparsity | mean task loss | n |",
            "|---|---|---|---|---|"]
    out += [f"| {r.task} | {_g(r.n_params_active, 2)} | {r.sparsity:.3g} | {r.mean:.4g} | "
            f"{r.n} |" for r in table[multi].itertuples()]
    return out + [""]


def make_report(table_or_sweep_dir, out_md, fig_dir=None, *, n_boot: int = 200,
                seed: int = 0) -> Path:
    """Write report.md (atomically) with fits, optima and figures; returns its path."""
    if isinstance(table_or_sweep_dir, pd.DataFrame):
        df, source = with_pretrain_loss(table_or_sweep_dir), "(DataFrame)"
    else:
        df, source = read_table(table_or_sweep_dir), str(table_or_sweep_dir)
    out_md = Path(out_md)
    fig_dir = Path(fig_dir) if fig_dir is not None else out_md.parent / "figures"
    lines = ["# Scaling and sparsity report", "", f"Source: `{source}`; {len(df)} runs.", ""]
    law_lines, chin = _law_section(df, n_boot, seed)
    lines += law_lines + _isoflop_section(df, chin) + _sparsity_section(df, n_boot, seed)
    lines += recipes.recipe_sections(df, table_or_sweep_dir, n_boot=n_boot, seed=seed)
    figs = plots.save_figures(df, fig_dir, fit=chin)
    lines += ["## Figures", ""]
    for name, paths in figs.paths.items():
        rel = os.path.relpath(paths[0], out_md.parent)
        lines.append(f"![{name}]({rel}) ([pdf]({os.path.relpath(paths[1], out_md.parent)}))")
    lines += [""] + [f"- {name} skipped: {why}" for name, why in figs.skipped.items()]
    return atomic_write_text(out_md, "\n".join(lines).rstrip() + "\n")

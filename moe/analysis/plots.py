"""Paper figures: each a function DataFrame -> matplotlib Figure (no pyplot, no global state).

Colours: Okabe & Ito (2008) for categories and viridis for sparsity, both readable with
colour-vision deficiencies; markers vary too so figures survive greyscale printing. A figure
that the table cannot support raises :class:`FigureSkipped` with the reason.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moe.analysis import findings as findmod
from moe.analysis import fit as fitmod
from moe.analysis import isoflop, sparsity
from moe.analysis.columns import describe_missing, ensure_canonical
from moe.analysis.tables import PRETRAIN_LOSS, TableError, finite_rows
from moe.io import atomic_write_bytes, claim_output_dir

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
SPARSITY_CMAP = "viridis"
LOSS_LABEL = "pre-training loss (nats/token)"


class FigureSkipped(Exception):
    """The table lacks what a figure needs; the message says what."""


def _need(df: pd.DataFrame, cols: list[str], what: str) -> pd.DataFrame:
    missing = [c for c in cols if c not in df]
    if missing:
        raise FigureSkipped(f"{what}: missing column(s) {describe_missing(df, missing)}")
    rows = finite_rows(df, [c for c in cols if c != "sparsity"])
    if len(rows) == 0:
        raise FigureSkipped(f"{what}: no row has valid {describe_missing(df, cols)}")
    return rows


def _sparsity_colours(fig: Figure, ax, values):
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    norm = Normalize(vmin=0.0, vmax=max(1e-9, float(np.nanmax(values))))
    mappable = ScalarMappable(norm=norm, cmap=colormaps[SPARSITY_CMAP])
    fig.colorbar(mappable, ax=ax, label="sparsity s = 1 - k/E")
    return lambda v: mappable.to_rgba(v)


def _metric_label(metric: str) -> str:
    return {"loss": "task loss (nats/token)", "bits_per_token": "task loss (bits/token)",
            "bits_per_byte": "task loss (bits/byte)", "accuracy": "accuracy (fraction)"}.get(
                metric, metric)


def fig_loss_vs_params(df: pd.DataFrame, *, n_col: str = "n_params_total") -> Figure:
    """(1) Pre-training loss vs parameters (log x), coloured by sparsity."""
    df = ensure_canonical(df)
    rows = _need(df, [n_col, PRETRAIN_LOSS], "loss vs parameters")
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.add_subplot()
    s = rows["sparsity"].to_numpy(float) if "sparsity" in rows else np.zeros(len(rows))
    colour = _sparsity_colours(fig, ax, s)
    ax.scatter(rows[n_col], rows[PRETRAIN_LOSS], c=[colour(v) for v in s], edgecolor="k",
               linewidth=0.4)
    ax.set_xscale("log")
    ax.set(xlabel=f"parameters N ({_n_kind(df)})", ylabel=LOSS_LABEL,
           title="Pre-training loss vs model size")
    return fig


def _long_or_skip(df: pd.DataFrame, metric: str, what: str) -> pd.DataFrame:
    long = sparsity.long_table(df, metric)
    if long.empty:
        raise FigureSkipped(f"{what}: the table has no task/<name>/{metric} columns "
                            "(name task loss columns with --task-col NAME=COLUMN[:KIND])")
    return long


def fig_task_vs_pretrain(df: pd.DataFrame, *, metric: str = "loss") -> Figure:
    """(2) Task metric vs pre-training loss: memorization and reasoning panels."""
    long = _long_or_skip(df, metric, "task vs pre-training loss").dropna(subset=[PRETRAIN_LOSS])
    if long.empty:
        raise FigureSkipped("task vs pre-training loss: no row has a pre-training loss")
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=False)
    s_all = long["sparsity"].to_numpy(float) if "sparsity" in long else np.zeros(len(long))
    colour = _sparsity_colours(fig, list(axes), s_all)
    for ax, kind in zip(axes, ("memorization", "reasoning"), strict=True):
        part = long[long["kind"] == kind]
        for j, (task, tp) in enumerate(part.groupby("task")):
            s = tp["sparsity"].to_numpy(float) if "sparsity" in tp else np.zeros(len(tp))
            ax.scatter(tp[PRETRAIN_LOSS], tp["value"], c=[colour(v) for v in s],
                       marker=MARKERS[j % len(MARKERS)], edgecolor="k", linewidth=0.4,
                       label=task)
        if part.empty:
            ax.text(0.5, 0.5, f"no {kind} tasks in the table", ha="center",
                    transform=ax.transAxes)
        else:
            ax.legend(title="task", fontsize=8)
        ax.set(xlabel=LOSS_LABEL, ylabel=_metric_label(metric), title=kind.capitalize())
    return fig


def _task_grid(n_tasks: int, width: float = 4.2):
    cols = min(n_tasks, 3)
    rows = int(np.ceil(n_tasks / cols))
    fig = Figure(figsize=(width * cols, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n_tasks:]:
        ax.set_visible(False)
    return fig, axes


def fig_task_vs_sparsity(df: pd.DataFrame, *, metric: str = "loss") -> Figure:
    """(3) Task metric vs sparsity, one line per width (and token budget, when the table
    has several), one panel per task."""
    long = _long_or_skip(df, metric, "task vs sparsity")
    for col in ("sparsity", "d_model"):
        if col not in long:
            raise FigureSkipped(f"task vs sparsity: the table has no {col!r} column")
    grouped, by = sparsity.width_groups(long)
    table = sparsity.loss_vs_sparsity(grouped, by=by)
    tasks = list(table["task"].unique())
    fig, axes = _task_grid(len(tasks))
    groups = list(table.groupby(by).groups)  # one style per group, the same in every panel
    for ax, task in zip(axes, tasks, strict=False):  # spare axes are hidden
        part = table[table["task"] == task]
        for group, wp in part.groupby(by):
            j = groups.index(group)
            label = f"d_model={group:g}" if by == "d_model" else f"d_model={group}"
            ax.plot(wp["sparsity"], wp["mean"], label=label, **_series_style(j))
        ax.set(xlabel="sparsity s = 1 - k/E", ylabel=_metric_label(metric),
               title=f"{task} ({part['kind'].iloc[0]})")
    handles, labels = axes[0].get_legend_handles_labels()
    width_in = fig.get_figwidth()  # an entry "d_model=64 @ 2.5e+05 tokens" takes ~2.6 in
    fig.legend(handles, labels, loc="outside lower center", fontsize=8,
               ncol=max(1, min(len(labels), int(width_in / 2.6))))  # below the panels
    return fig


def _series_style(j: int) -> dict:
    """Colour and marker of series j: distinct pairs for 64 series (both cycles have 8)."""
    return {"color": OKABE_ITO[j % len(OKABE_ITO)],
            "marker": MARKERS[(j + j // len(OKABE_ITO)) % len(MARKERS)]}


def fig_task_vs_tpp(df: pd.DataFrame, *, metric: str | None = None) -> Figure:
    """(4) Task metric vs tokens per parameter (log x), coloured by sparsity."""
    metric = metric or ("accuracy" if sparsity.tasks_with(df, "accuracy") else "loss")
    long = _long_or_skip(df, metric, "task vs TPP")
    if "tpp" not in long or long["tpp"].isna().all():
        raise FigureSkipped("task vs TPP: the table has no 'tpp' column")
    long = long.dropna(subset=["tpp"])
    tasks = list(long["task"].unique())
    fig, axes = _task_grid(len(tasks))
    s_all = long["sparsity"].to_numpy(float) if "sparsity" in long else np.zeros(len(long))
    colour = _sparsity_colours(fig, list(axes[:len(tasks)]), s_all)
    for ax, task in zip(axes, tasks, strict=False):  # spare axes are hidden
        tp = long[long["task"] == task]
        s = tp["sparsity"].to_numpy(float) if "sparsity" in tp else np.zeros(len(tp))
        ax.scatter(tp["tpp"], tp["value"], c=[colour(v) for v in s], edgecolor="k",
                   linewidth=0.4)
        ax.set_xscale("log")
        note = " (one TPP value only)" if tp["tpp"].nunique() == 1 else ""
        ax.set(xlabel="tokens per parameter D/N (tokens/param)", ylabel=_metric_label(metric),
               title=f"{task} ({tp['kind'].iloc[0]}){note}")
    return fig


def fig_isoflop(df: pd.DataFrame, *, n_col: str = "n_params_total") -> Figure:
    """(5) IsoFLOP curves: loss vs N per compute budget, parabola fits and their minima."""
    df = ensure_canonical(df)
    rows = _need(df, [n_col, "flops", PRETRAIN_LOSS], "IsoFLOP curves")
    tokens = rows["tokens"] if "tokens" in rows and rows["tokens"].notna().all() else None
    res = isoflop.fit_isoflop(rows[n_col], rows[PRETRAIN_LOSS], rows["flops"], tokens=tokens)
    if not res.budgets:
        raise FigureSkipped(f"IsoFLOP curves: no compute budget with >= 3 model sizes "
                            f"({describe_missing(df, ['flops'])} groups the budgets; a "
                            "fixed-TPP sweep gives one run per budget)")
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    labels = isoflop.bin_budgets(rows["flops"].to_numpy(float))
    for j, b in enumerate(res.budgets):
        sel = np.isclose(labels, isoflop.bin_budgets(np.array([b.flops]))[0])
        n, loss = rows[n_col].to_numpy(float)[sel], rows[PRETRAIN_LOSS].to_numpy(float)[sel]
        c = OKABE_ITO[j % len(OKABE_ITO)]
        tag = "" if b.interior else " (excluded: minimum not inside)"
        ax.scatter(n, loss, color=c, marker=MARKERS[j % len(MARKERS)],
                   label=f"C={b.flops:.2g}{tag}")
        x = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        ax.plot(np.exp(x), np.polyval(b.coef[::-1], x), color=c, lw=1,
                ls="-" if b.interior else ":")
        if b.interior:
            ax.plot([b.n_opt], [b.loss_opt], marker="*", color=c, ms=12, mec="k")
    ax.set_xscale("log")
    slope = (f"a = {res.a:.3f}; parabola vertex is biased" if res.verdict.identified
             else "a not identified")
    ax.set(xlabel=f"parameters N ({_n_kind(df)})", ylabel=LOSS_LABEL,
           title=f"IsoFLOP profiles (Approach 2)\n{slope}")
    ax.legend(title="compute (FLOPs)", fontsize=8)
    return fig


def _n_kind(df: pd.DataFrame) -> str:
    return str(df.attrs.get("column_names", {}).get("n_params_total", "n_params_total"))


def fig_law_contours(df: pd.DataFrame, *, fit: fitmod.LawFit | None = None,
                     n_col: str = "n_params_total", d_col: str = "tokens") -> Figure:
    """(6) Contours of the fitted L(N, D), the data, and the compute-optimal frontier."""
    df = ensure_canonical(df)
    rows = _need(df, [n_col, d_col, PRETRAIN_LOSS], "L(N, D) contours")
    if fit is None:
        try:
            fit = fitmod.fit_table(rows, n_col=n_col, d_col=d_col, loss_col=PRETRAIN_LOSS,
                                   flops_col="flops" if "flops" in rows else None)
        except TableError as exc:
            raise FigureSkipped(f"L(N, D) contours: {exc}") from exc
    n, d = rows[n_col].to_numpy(float), rows[d_col].to_numpy(float)
    gn = np.logspace(np.log10(n.min()) - 0.5, np.log10(n.max()) + 0.5, 120)
    gd = np.logspace(np.log10(d.min()) - 0.5, np.log10(d.max()) + 0.5, 120)
    nn, dd = np.meshgrid(gn, gd)
    fig = Figure(figsize=(6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    cs = ax.contourf(nn, dd, fit.predict(nn, dd), levels=20, cmap="cividis")
    fig.colorbar(cs, ax=ax, label="fitted L(N, D) (nats/token)")
    ax.scatter(n, d, c="w", edgecolor="k", s=22, label="runs")
    note = ""
    if fit.verdict.identified:
        k, v = fit.fpt
        c_grid = np.logspace(np.log10(k * gn.min() ** v * gd.min()),
                             np.log10(k * gn.max() ** v * gd.max()))
        n_opt, d_opt = fit.allocation(c_grid)
        inside = (n_opt >= gn.min()) & (n_opt <= gn.max()) & (d_opt >= gd.min()) & (
            d_opt <= gd.max())
        ax.plot(n_opt[inside], d_opt[inside], color="#D55E00", lw=2,
                label=f"compute-optimal frontier (a = {fit.a:.3f})")
    else:
        why = textwrap.shorten(f"not identified: {fit.verdict.reasons[0]}", 100)
        note = "\n" + "\n".join(textwrap.wrap(why, 48))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel=f"parameters N ({_n_kind(df)})", ylabel="training tokens D",
           title=f"Fitted L(N, D) = E + A/N^alpha + B/D^beta{note}")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def fig_findings(df: pd.DataFrame, *, found: list | None = None) -> Figure:
    """(7) The paper's findings: each estimate with its 95% interval (bar) and its null's
    boundaries (dashed), one panel per finding, the verdict in the panel's title."""
    found = found if found is not None else findmod.compute_findings(df)
    if all(f.estimate is None for f in found):
        raise FigureSkipped("findings: no finding has an estimate (" + "; ".join(
            f"{f.id}: {f.reason}" for f in found) + ")")
    fig = Figure(figsize=(7, 1.9 * len(found) + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(found), 1, squeeze=False).ravel())
    for ax, f in zip(axes, found, strict=True):
        ax.set_yticks([])
        for j, edge in enumerate(f.null_at):
            ax.axvline(edge, color="#D55E00", ls="--", lw=1, label="null" if j == 0 else None)
        if f.null_band:
            ax.axvspan(*f.null_band, color="#D55E00", alpha=0.15, lw=0,
                       label="95% without the effect (permutations)")
        if f.estimate is not None:
            lo = f.ci_low if f.ci_low is not None else f.estimate
            hi = f.ci_high if f.ci_high is not None else f.estimate
            ax.hlines(0, lo, hi, color=OKABE_ITO[0], lw=2, label="95% interval")
            ax.plot([lo, hi], [0, 0], "|", color=OKABE_ITO[0], ms=14)
            ax.plot([f.estimate], [0], "o", color=OKABE_ITO[1], label="estimate")
            ax.legend(fontsize=7, loc="upper right")
            if f.ci_low is None or f.ci_high is None:
                ax.text(0.02, 0.15, "no interval: " + f.reason[:60], transform=ax.transAxes,
                        fontsize=7)
        else:
            ax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"no estimate: {f.reason}", 80)),
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_xlabel(f.unit, fontsize=8)
        ax.set_title("\n".join(textwrap.wrap(f"{f.id}: {f.verdict} (n = {f.n_runs})", 95)),
                     fontsize=9)
    return fig


def fig_dissociation(df: pd.DataFrame, *, found: list | None = None) -> Figure:
    """(8) The dissociation, directly: (a) per fixed-active-parameter group, the sparsity
    with the lowest pre-training loss against the one with the lowest reasoning loss
    (below the diagonal: reasoning best at a denser model); (b) the reasoning residual at
    equal pre-training loss against sparsity, centred within each group."""
    from moe.analysis import findings_stats as fs
    rows = findmod.optimum_rows(findmod.run_table(df)) if df is not None else pd.DataFrame()
    if len(rows) < findmod.MIN_RUNS:
        raise FigureSkipped("dissociation: no fixed-active-parameter group has runs at "
                            f"{findmod.MIN_SPARSITIES}+ sparsities with a reasoning loss")
    by_id = {f.id: f for f in (found or [])}
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax_a, ax_b = fig.subplots(1, 2)
    opt = fs.group_optima(rows)
    pairs = opt.groupby(["x_loss", "x_reasoning"]).size().reset_index(name="n")
    span = [min(opt[["x_loss", "x_reasoning"]].min()) - 0.5,
            max(opt[["x_loss", "x_reasoning"]].max()) + 0.5]
    ax_a.plot(span, span, color="#999999", lw=1, ls="--", label="same optimum")
    ax_a.scatter(pairs["x_loss"], pairs["x_reasoning"], s=60 * pairs["n"], color=OKABE_ITO[0],
                 alpha=0.7, label="groups (area: count)")
    for r in pairs.itertuples():
        ax_a.annotate(str(r.n), (r.x_loss, r.x_reasoning), ha="center", va="center",
                      fontsize=7, color="white")
    ticks = np.arange(np.ceil(span[0]), span[1])
    for set_ticks, set_labels in ((ax_a.set_xticks, ax_a.set_xticklabels),
                                  (ax_a.set_yticks, ax_a.set_yticklabels)):
        set_ticks(ticks)
        set_labels([f"{2 ** t:g}" for t in ticks])
    gap = by_id.get(findmod.GAP.id)
    ax_a.set(xlabel="E/k with the lowest pre-training loss",
             ylabel="E/k with the lowest reasoning loss", xlim=span, ylim=span)
    ax_a.set_title("\n".join(textwrap.wrap("(a) optimum per group" + (
        f": {gap.verdict}" if gap else ""), 60)), fontsize=9)
    ax_a.legend(fontsize=7, loc="upper left")
    _residual_panel(ax_b, rows, by_id.get(findmod.FANOUT.id))
    return fig


def _residual_panel(ax, rows: pd.DataFrame, fan) -> None:
    from moe.analysis import findings_stats as fs
    x = fs.log_ratio(rows["sparsity"])
    resid = pd.Series(fs.fanout_residuals(rows), index=rows.index)
    centred = resid - resid.groupby(rows["group"]).transform("mean")
    ax.scatter(x, centred, s=8, color="#999999", alpha=0.5, label="runs")
    means = centred.groupby(x).agg(["mean", "sem"])
    ax.errorbar(means.index, means["mean"], yerr=1.96 * means["sem"].fillna(0), fmt="o-",
                color=OKABE_ITO[1], ms=5, label="mean, +-1.96 SE")
    ax.axhline(0, color="#D55E00", ls="--", lw=1)
    if fan is not None and fan.estimate is not None:
        grid = np.array([x.min(), x.max()])
        ax.plot(grid, fan.estimate * (grid - x.mean()), color=OKABE_ITO[0],
                label=f"slope {fan.estimate:.2g} per doubling")
    ax.set_xticks(np.unique(x))
    ax.set_xticklabels([f"{2 ** t:g}" for t in np.unique(x)])
    ax.set(xlabel="E/k (sparsity s = 1 - k/E)",
           ylabel="reasoning residual at equal pre-training loss,\ncentred per group (nats)")
    ax.set_title("\n".join(textwrap.wrap("(b) reasoning at equal loss" + (
        f": {fan.verdict}" if fan else ""), 60)), fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


FIGURES = {
    "fig1_loss_vs_params": fig_loss_vs_params,
    "fig2_task_vs_pretrain": fig_task_vs_pretrain,
    "fig3_task_vs_sparsity": fig_task_vs_sparsity,
    "fig4_task_vs_tpp": fig_task_vs_tpp,
    "fig5_isoflop": fig_isoflop,
    "fig6_law_contours": fig_law_contours,
    "fig7_findings": fig_findings,
    "fig8_dissociation": fig_dissociation,
}


FIGURE_FILES = frozenset(f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf"))
"""The files a figure directory may hold besides its marker (rerunning plot or report)."""


def claim_figure_dir(out_dir: str | Path, *, force: bool = False) -> Path:
    """A figure directory that is new, empty or holds only figures; anything else is refused
    (exit 2) unless `force`, so figures never land among unrelated files."""
    return claim_output_dir(out_dir, "plot", force=force, own_names=FIGURE_FILES)


@dataclass(frozen=True, kw_only=True)
class FigureSet:
    """Saved figure files and the figures skipped, with reasons."""

    paths: dict = field(default_factory=dict)  # name -> [png, pdf]
    skipped: dict = field(default_factory=dict)  # name -> reason


def save_figure(fig: Figure, out_dir: str | Path, name: str, *, dpi: int = 150) -> list[Path]:
    """Save as PNG and PDF, each atomically; returns the paths."""
    out = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi)
        out.append(atomic_write_bytes(Path(out_dir) / f"{name}.{ext}", buf.getvalue()))
    return out


def save_figures(df: pd.DataFrame, out_dir: str | Path, *, fit=None,
                 found: list | None = None, force: bool = False,
                 names: list[str] | None = None, claimed: bool = False) -> FigureSet:
    """Draw and save every figure the table supports (or those of ``names``); record why the
    others were skipped. ``fit`` (the Approach-3 fit) and ``found`` (the findings) spare
    figures 6-8 a refit. ``out_dir`` must be new, empty or a figure directory
    (`claim_figure_dir`), unless the caller ``claimed`` it already."""
    if not claimed:
        claim_figure_dir(out_dir, force=force)
    paths, skipped = {}, {}
    extra = {"fig6_law_contours": {"fit": fit}, "fig7_findings": {"found": found},
             "fig8_dissociation": {"found": found}}
    for name, func in FIGURES.items():
        if names is not None and name not in names:
            continue
        try:
            fig = func(df, **extra.get(name, {}))
        except FigureSkipped as exc:
            skipped[name] = str(exc)
            continue
        paths[name] = save_figure(fig, out_dir, name)
    return FigureSet(paths=paths, skipped=skipped)


def merge_figure_sets(*sets: FigureSet) -> FigureSet:
    """One FigureSet of several, in the order of FIGURES."""
    paths = {k: v for s in sets for k, v in s.paths.items()}
    skipped = {k: v for s in sets for k, v in s.skipped.items()}
    return FigureSet(paths={k: paths[k] for k in FIGURES if k in paths},
                     skipped={k: skipped[k] for k in FIGURES if k in skipped})


def save_all_figures(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Every figure the table supports, as PNG and PDF paths (skips are silently left out;
    use :func:`save_figures` for the reasons)."""
    return [p for pair in save_figures(df, out_dir).paths.values() for p in pair]

"""Figures, `moe plot` and `moe report` on small tables, including tables lacking columns."""

import argparse

import matplotlib
import pytest

from moe.analysis import plots, synthetic
from moe.analysis.report import make_report
from moe.app import analysis_cmd as cli

matplotlib.use("Agg")
TRUTH = {"E": 1.8, "A": 450.0, "B": 2000.0, "alpha": 0.34, "beta": 0.37}


@pytest.fixture(scope="module")
def pocket():
    return synthetic.pocket_table(seed=0)


def labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.get_visible()]


def test_fig1_axes(pocket):
    fig = plots.fig_loss_vs_params(pocket)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "parameters" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
    assert any("sparsity" in a.get_ylabel() for a in fig.axes[1:])  # the colour bar


def test_fig2_panels(pocket):
    fig = plots.fig_task_vs_pretrain(pocket)
    titles = [ax.get_title() for ax in fig.axes]
    assert "Memorization" in titles and "Reasoning" in titles
    assert all("pre-training loss" in x for x, _ in labels(fig)[:2])


def test_fig3_and_fig4(pocket):
    fig3 = plots.fig_task_vs_sparsity(pocket)
    assert [x for x, _ in labels(fig3)] == ["sparsity s = 1 - k/E"] * 2
    assert len(fig3.axes[0].get_lines()) == 3  # one line per width
    fig4 = plots.fig_task_vs_tpp(pocket)
    assert fig4.axes[0].get_xscale() == "log"
    assert "accuracy" in fig4.axes[0].get_ylabel()


def test_fig5_and_fig6_on_isoflop_table():
    df = synthetic.isoflop_table(TRUTH)
    fig5 = plots.fig_isoflop(df)
    assert len(fig5.axes[0].collections) == 3  # one scatter per budget
    assert "biased" in fig5.axes[0].get_title()
    fig6 = plots.fig_law_contours(df)
    ax = fig6.axes[0]
    assert ax.get_xlabel() == "parameters N (n_params_total)"
    assert ax.get_ylabel() == "training tokens D"
    assert any("frontier" in t.get_text() for t in ax.get_legend().get_texts())


def test_skips_with_reasons(pocket):
    with pytest.raises(plots.FigureSkipped, match="compute budget"):
        plots.fig_isoflop(pocket)  # fixed TPP: one run per budget
    no_tasks = pocket[[c for c in pocket if not c.startswith("task/")]]
    with pytest.raises(plots.FigureSkipped, match="task/<name>/loss"):
        plots.fig_task_vs_pretrain(no_tasks)
    with pytest.raises(plots.FigureSkipped, match=r"missing column\(s\) 'n_params_total' "
                                                  r"\(--n-col\)"):
        plots.fig_loss_vs_params(no_tasks.drop(columns=["n_params_total"]))


def test_save_all_figures_writes_png_and_pdf(pocket, tmp_path):
    paths = plots.save_all_figures(pocket, tmp_path)
    names = {p.name for p in paths}
    assert "fig1_loss_vs_params.png" in names and "fig1_loss_vs_params.pdf" in names
    assert len(paths) == 12  # six figures; the IsoFLOP one is skipped for a fixed-TPP sweep
    assert all(p.stat().st_size > 1000 for p in paths)


def test_figures_go_only_into_a_figure_directory(pocket, tmp_path):
    from moe.io import OutputDirNotEmpty

    figs = tmp_path / "figures"
    figs.mkdir()
    (figs / "fig1_loss_vs_params.png").write_bytes(b"")  # an earlier plot's (or report's)
    plots.claim_figure_dir(figs)
    other = tmp_path / "other" / "figures"  # not made by plot, holding another file
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("someone's files")
    with pytest.raises(OutputDirNotEmpty, match=str(other)):
        plots.save_figures(pocket, other)
    with pytest.raises(OutputDirNotEmpty, match="--force"):  # refused before any fit
        make_report(pocket, tmp_path / "other" / "report.md", n_boot=10)
    assert sorted(p.name for p in other.parent.rglob("*")) == ["figures", "notes.txt"]
    plots.claim_figure_dir(other, force=True)


def test_cli_plot_all_seven_from_sweep_dir(tmp_path, capsys):
    df = synthetic.isoflop_table(TRUTH)
    pocket = synthetic.pocket_table()
    tasks = [c for c in pocket if c.startswith("task/")]
    for col in tasks + ["sparsity", "d_model", "top_k", "n_experts"]:
        df[col] = pocket[col].iloc[: len(df)].to_numpy()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    df.to_parquet(sweep / "results.parquet")
    parser = argparse.ArgumentParser(prog="moe")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["plot", str(sweep), "-o", str(tmp_path / "figs")])
    assert args.func(args) == 0
    skipped = [ln for ln in capsys.readouterr().out.splitlines() if "skipped" in ln]
    # every run has its own token budget: no fixed-active-parameter group for figure 8
    assert [ln.split(":")[0] for ln in skipped] == ["fig8_dissociation"]
    assert len(list((tmp_path / "figs").glob("fig*.png"))) == 7


def test_report_on_pocket_sweep_notes_fixed_tpp(pocket, tmp_path):
    out = make_report(pocket, tmp_path / "report.md", n_boot=10)
    text = out.read_text()
    assert "same tokens per parameter" in text
    assert "Fixed-TPP law L(N)" in text
    assert "arith (reasoning)" in text
    assert "fig5_isoflop skipped" in text
    assert (tmp_path / "figures" / "fig1_loss_vs_params.png").exists()


def test_report_cli_on_grid_table(tmp_path):
    path = tmp_path / "t.csv"
    synthetic.isoflop_table(TRUTH).to_csv(path, index=False)
    parser = argparse.ArgumentParser(prog="moe")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(path), "-o", str(tmp_path / "r.md"),
                              "--bootstrap", "8"])
    assert args.func(args) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Compute-optimal allocation" in text and "Approach 2" in text
    assert "Leave-out validation" in text and "Skipped: the table has no task" in text


def _texts_outside_canvas(fig) -> list[str]:
    """What leaves the figure's box by more than half a pixel: the drawn extent of every
    visible panel (its title, axis labels, the tick labels it draws, its legend) and every
    figure-level text or legend. Empty when everything fits."""
    fig.canvas.draw()  # lays out (constrained layout) and gives every text its final place
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    items = [(f"panel {ax.get_title()!r}", ax) for ax in fig.axes if ax.get_visible()]
    items += [(f"text {t.get_text()!r}", t) for t in fig.texts if t.get_text().strip()]
    items += [("figure legend", leg) for leg in fig.legends]
    out = []
    for name, artist in items:
        ext = artist.get_tightbbox(renderer)
        if (ext.x0 < box.x0 - 0.5 or ext.y0 < box.y0 - 0.5 or ext.x1 > box.x1 + 0.5
                or ext.y1 > box.y1 + 0.5):
            out.append(name[:70])
    return out


def _findings_table():
    return synthetic.findings_table(seed=0)


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
@pytest.mark.parametrize("table", ["pocket", "isoflop", "findings"])
def test_every_text_of_every_figure_lies_inside_the_canvas(name, table):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    df = {"pocket": synthetic.pocket_table, "isoflop": lambda: synthetic.isoflop_table(TRUTH),
          "findings": _findings_table}[table]()
    try:
        fig = plots.FIGURES[name](df)
    except plots.FigureSkipped:
        pytest.skip(f"{name} does not apply to the {table} table")
    FigureCanvasAgg(fig)
    assert _texts_outside_canvas(fig) == []


def test_canvas_check_catches_a_cut_off_title():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3, 2), layout="constrained")
    fig.add_subplot().set_title("a title far too long to fit a three-inch wide canvas " * 2)
    FigureCanvasAgg(fig)
    assert len(_texts_outside_canvas(fig)) == 1


def test_findings_figure_draws_each_interval_and_null():
    from moe.analysis import findings
    df = _findings_table()
    found = findings.compute_findings(df, n_boot=200)
    fig = plots.fig_findings(df, found=found)
    assert len(fig.axes) == 4
    for ax, f in zip(fig.axes, found, strict=True):
        assert f.verdict in ax.get_title().replace("\n", " ")
        bars = [c for c in ax.collections if c.get_segments()]  # the errorbar's line
        (seg,) = bars[0].get_segments()
        assert seg[:, 0].min() == pytest.approx(f.ci_low)
        assert seg[:, 0].max() == pytest.approx(f.ci_high)
        nulls = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert nulls == pytest.approx(list(f.null_at))


def test_findings_figure_says_when_there_is_no_interval_or_no_estimate():
    """A finding without an interval (too lopsided a bootstrap) draws its estimate alone
    and says why; one that is not testable draws no number at all."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from moe.analysis import findings
    common = dict(statement="", null="", resolved=False, agrees_with_paper=None, n_runs=10,
                  unit="s", null_at=(0.0,))
    lopsided = findings.Finding(id="a", estimate=0.98, ci_low=None, ci_high=None,
                                reason="no interval: too lopsided", **common)
    untestable = findings.Finding(id="b", estimate=None, ci_low=None, ci_high=None,
                                  reason="not testable: one group", **common,
                                  preconditions=(findings.Precondition(
                                      what="two groups", holds=False, detail="1 group"),))
    fig = plots.fig_findings(None, found=[lopsided, untestable])
    FigureCanvasAgg(fig)
    ax_a, ax_b = fig.axes
    assert [ln.get_xdata()[0] for ln in ax_a.get_lines() if ln.get_marker() == "o"] == [0.98]
    assert any("no interval" in t.get_text() for t in ax_a.texts)
    assert "not testable at this scale: two groups" in ax_b.get_title()
    assert not [ln for ln in ax_b.get_lines() if ln.get_marker() == "o"]


def test_dissociation_figure_shows_each_groups_optima_and_the_residual_slope():
    from moe.analysis import findings
    from moe.analysis import findings_stats as fs
    df = _findings_table()
    found = findings.compute_findings(df, n_boot=200)
    fig = plots.fig_dissociation(df, found=found)
    ax_a, ax_b = fig.axes
    opt = fs.group_optima(findings.optimum_rows(findings.run_table(df)))
    (points,) = ax_a.collections
    drawn = {tuple(p) for p in points.get_offsets()}
    assert drawn == set(zip(opt["x_loss"], opt["x_reasoning"], strict=True))
    fan = found[1]
    slope = [ln for ln in ax_b.get_lines() if "slope" in (ln.get_label() or "")]
    (xs, ys) = slope[0].get_data()
    assert (ys[1] - ys[0]) / (xs[1] - xs[0]) == pytest.approx(fan.estimate)
    with pytest.raises(plots.FigureSkipped, match="3\\+ sparsities"):
        plots.fig_dissociation(synthetic.findings_table(experts=(1, 2), top_ks=(1,)))


def test_sparsity_figure_styles_up_to_64_series_apart_and_alike_across_panels():
    pairs = {(plots._series_style(j)["color"], plots._series_style(j)["marker"])
             for j in range(64)}
    assert len(pairs) == 64  # the demo's 9 width x budget groups no longer share a style

"""`moe fit`, `moe plot` and `moe report`: registered on the lead's argparse subparsers.

Handlers return an exit code; user errors raise TableError (a ValueError) with a one-line
message, which ``moe``'s main() prints as ``error: <message>`` (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe.analysis.tables import PRETRAIN_LOSS, TableError, atomic_write_text, read_table


def _fit(args: argparse.Namespace) -> int:
    from moe.analysis import fit as fitmod
    from moe.analysis.bootstrap import bootstrap_fit

    df = read_table(args.table)
    loss_col = args.loss_col or PRETRAIN_LOSS
    data = fitmod.prepare(df, law=args.law, n_col=args.n_col, d_col=args.d_col,
                          loss_col=loss_col, c_col=args.c_col, drop_highest=args.drop_highest)
    result = fitmod.fit_data(data)
    record = result.to_dict()
    record["intervals"] = {}
    if args.bootstrap:
        if args.bootstrap < 2:
            raise TableError(f"--bootstrap needs at least 2 resamples, got {args.bootstrap}")
        boot = bootstrap_fit(result, data, n_resamples=args.bootstrap, seed=args.seed)
        summary = boot.to_dict()
        record["intervals"] = summary.pop("intervals")
        record["bootstrap"] = summary
    if fitmod.is_fixed_tpp(data):
        record["note"] = ("tokens per parameter is constant in this table: L(N, D) is not "
                          "identifiable; use --law fixed_data")
    text = json.dumps(record, indent=2, allow_nan=False, default=float)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    p = result.params
    print(f"{args.law}: " + ", ".join(f"{k}={v:.4g}" for k, v in p.items())
          + f"; objective={result.objective:.6g}; n={result.n_points}; "
          f"{result.seconds:.2f}s" + (f" -> {args.output}" if args.output else ""))
    if "note" in record:
        print(f"note: {record['note']}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from moe.analysis import plots

    figs = plots.save_figures(read_table(args.source), args.output)
    for name, paths in figs.paths.items():
        print(f"{name}: {paths[0]} (+ .pdf)")
    for name, why in figs.skipped.items():
        print(f"{name}: skipped: {why}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from moe.analysis.report import make_report

    out = Path(args.output)
    path = make_report(args.source, out, args.fig_dir, n_boot=args.bootstrap, seed=args.seed)
    print(f"report: {path}")
    return 0


def register(subparsers) -> None:
    """Add the ``fit``, ``plot`` and ``report`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("fit", help="fit a scaling law (Approach 3) to a results table")
    p.add_argument("table", help="results table (.csv or .parquet) or a sweep directory")
    p.add_argument("--law", choices=("chinchilla", "fixed_data"), default="chinchilla")
    p.add_argument("--n-col", default="n_params_total",
                   help="parameter column: n_params_total or n_params_active")
    p.add_argument("--d-col", default="tokens", help="tokens column")
    p.add_argument("--c-col", default=None, help="compute column: D = C / (6 N) replaces --d-col")
    p.add_argument("--loss-col", default=None,
                   help="loss column (default: val_loss, falling back to train_loss)")
    p.add_argument("--drop-highest", type=int, default=0, metavar="K",
                   help="drop the K highest-loss rows first (the reference fit drops 5)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K", help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="fit.json")
    p.set_defaults(func=_fit)

    p = subparsers.add_parser("plot", help="draw the paper figures (PNG and PDF)")
    p.add_argument("source", help="sweep directory or results table")
    p.add_argument("-o", "--output", required=True, help="figure directory")
    p.set_defaults(func=_plot)

    p = subparsers.add_parser("report", help="write a Markdown report: fits, optima, figures")
    p.add_argument("source", help="sweep directory or results table")
    p.add_argument("-o", "--output", default="report.md")
    p.add_argument("--fig-dir", default=None, help="default: figures/ next to the report")
    p.add_argument("--bootstrap", type=int, default=200, metavar="K")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_report)

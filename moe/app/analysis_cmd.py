"""`moe fit`, `moe predict`, `moe plot` and `moe report`: registered on the lead's argparse
subparsers.

Handlers return an exit code; user errors raise TableError (a ValueError) with a one-line
message, which ``moe``'s main() prints as ``error: <message>`` (exit 2). Nothing heavy
(pandas, scipy, matplotlib, never torch) is imported until a handler runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe.errors import BadInput


def _warn(record: dict, what: str) -> None:
    """Every warning of a fitted object to stderr, and 'not identified' when it is not."""
    for text in record.get("warnings", []):
        print(f"warning: {what}: {text}", file=sys.stderr)
    if not record.get("identified", True):
        print(f"warning: {what} is NOT identified: do not report its numbers as findings",
              file=sys.stderr)


def _columns(args: argparse.Namespace):
    from moe.analysis.columns import Columns, parse_task_flag

    flags = {"n": args.n_col, "d": args.d_col, "c": args.c_col, "loss": args.loss_col}
    for role in ("sparsity", "width", "top_k", "n_experts", "n_active", "tpp", "granularity"):
        flags[role] = getattr(args, f"{role}_col", None)
    tasks = [parse_task_flag(t) for t in getattr(args, "task_col", None) or []]
    if args.columns:
        return Columns.from_toml(args.columns, flags, tasks)
    return Columns.build(flags, tasks)


def _select(df, expr: str | None, flag: str):
    from moe.analysis.tables import select

    return select(df, expr, flag)


def _fit(args: argparse.Namespace) -> int:
    from moe.analysis.tables import TableError, read_table
    from moe.io import atomic_write_text

    if args.bootstrap is not None and args.bootstrap not in (0,) and args.bootstrap < 2:
        raise TableError(f"--bootstrap needs 0 or at least 2 resamples, got {args.bootstrap}")
    cols = _columns(args)
    df = read_table(args.table)
    test = _select(df, args.test_where, "--test-where") if args.test_where else None
    train = _select(df, args.where, "--where")
    if test is not None:
        train = train.drop(index=test.index, errors="ignore")
        if train.empty:
            raise TableError("--test-where leaves no rows to fit on")
    record, summary = _fit_record(train, test, cols, args)
    record["selection"] = {"where": args.where, "test_where": args.test_where,
                           "table_rows": len(df), "fitted_rows": len(train)}
    text = json.dumps(record, indent=2, allow_nan=False, default=float)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    _warn(record, f"approach {args.approach} fit" if not args.compare else "law comparison")
    print(summary + (f" -> {args.output}" if args.output else ""))
    if "identified" in record and not record["identified"]:
        print(f"not identified: {'; '.join(record.get('reasons', []))} (the numbers above are "
              "diagnostics, not findings)")
    return 0


def _fit_record(train, test, cols, args) -> tuple[dict, str]:
    """The record and summary line, all built in moe.analysis.records."""
    from moe.analysis import isoflop, records
    from moe.analysis.tables import TableError

    common = {"n_boot": args.bootstrap, "seed": args.seed}
    if args.compare:
        names = [n.strip() for n in args.compare.split(",") if n.strip()]
        if len(names) < 2:
            raise TableError(f"--compare needs at least two laws, got {args.compare!r}")
        return records.compare_record(_union(train, test), None if test is None else test.index,
                                      names, cols, c_col=args.c_col, **common)
    if args.approach == 2:
        if test is not None:
            raise TableError("--test-where needs --approach 3 (Approach 2 has no law to "
                             "predict with)")
        window = isoflop.Window.parse(args.window) if args.window else None
        record, summary, dropped = records.approach2_record(
            train, cols, c_col=args.c_col or cols.c, window=window, **common)
        _dropped(dropped, [cols.n, cols.loss, args.c_col or cols.c])
        return record, summary
    if args.law in ("chinchilla", "fixed_data"):
        record, summary, dropped = records.approach3_record(
            train, test, cols, law=args.law, c_col=args.c_col,
            drop_highest=args.drop_highest, **common)
        for count, which in dropped:
            _dropped(count, [cols.n, cols.loss], which)
        return record, summary
    return records.law_record(train, test, args.law, cols, c_col=args.c_col, **common)


def _union(train, test):
    """The fit rows and the held-out rows, once each (a --compare split needs both)."""
    import pandas as pd

    return train if test is None else pd.concat([train, test.loc[~test.index.isin(
        train.index)]])


def _dropped(count: int, columns, which: str = "") -> None:
    if count:
        print(f"dropped {count} {which}row(s) with NaN in {', '.join(map(repr, columns))}",
              file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    from moe.analysis import predict

    path = Path(args.fit)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such fit file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not a fit written by `moe fit` (not JSON: {exc})") from None
    predict.check_record(record, str(path))
    if args.optimize:
        out = _optimize(record, args, str(path))
    else:
        out = predict.predict_from_record(record, args.n, args.d, e=args.e, g=args.g, s=args.s,
                                          path=str(path))
    _warn(record, f"fit {path}")
    for text in out.get("range_warnings", []):
        print(f"warning: {text}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(out, allow_nan=False, default=float))
        return 0
    print(_predict_text(out, args.optimize))
    return 0


def _optimize(record: dict, args, path: str) -> dict:
    from moe.analysis import predict
    from moe.analysis.lawforms.allocate import Budget

    if args.flops is None and args.n is None:
        raise BadInput("--optimize needs --flops C (or --n for the clark-routed law)")
    budget = Budget(flops=args.flops or 0.0, memory_bytes=args.memory,
                    bytes_per_param=args.bytes_per_param, top_k=args.top_k,
                    expert_share=args.expert_share, granularity=args.g, n=args.n)
    return predict.optimize_from_record(record, budget, path=path)


def _predict_text(out: dict, optimize: bool) -> str:
    caveat = "" if out["identified"] else (" (from a fit that is not identified: a "
                                           "diagnostic, not a finding)")
    if optimize:
        shown = {k: v for k, v in out.items() if k not in ("by_experts", "range_warnings",
                                                            "identified", "law")}
        return (f"{out['law']} optimum: " + ", ".join(
            f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
            for k, v in shown.items()) + caveat)
    shown = f"loss = {out['loss']:.6g}"
    iv = out.get("interval")
    if iv:
        shown += f" ({100 * out['level']:.0f}% interval [{iv[0]:.6g}, {iv[1]:.6g}])"
    return shown + caveat


def _plot(args: argparse.Namespace) -> int:
    from moe.analysis import plots
    from moe.analysis.tables import TableError, read_table

    cols = _columns(args)
    df = _select(read_table(args.source), args.where, "--where")
    figs = plots.save_figures(cols.canonical(df), args.output, force=args.force)
    for name, paths in figs.paths.items():
        print(f"{name}: {paths[0]} (+ .pdf)")
    for name, why in figs.skipped.items():
        print(f"{name}: skipped: {why}")
    if not figs.paths:
        raise TableError("no figure could be made from this table (see the reasons above)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from moe.analysis.tables import read_table

    cols = _columns(args)
    df = _select(read_table(args.source), args.where, "--where")
    if args.findings_only:  # imports no fitting or plotting code
        return _findings_only(cols.canonical(df), args)
    from moe.analysis.report import make_report

    path = make_report(cols.canonical(df), Path(args.output or "report.md"), args.fig_dir,
                       n_boot=args.bootstrap, seed=args.seed, source=str(args.source),
                       n_label=cols.n, force=args.force)
    print(f"report: {path}")
    return 0


def _findings_only(df, args: argparse.Namespace) -> int:
    """The findings section on stdout, and findings.json at -o: no fits, no figures."""
    from moe.analysis import findings
    from moe.analysis.tables import TableError
    from moe.io import atomic_write_text

    if args.output is not None and not str(args.output).endswith(".json"):
        raise TableError(f"--findings-only writes the findings as JSON: give -o FILE.json, "
                         f"not {args.output!r}")
    missing = findings.missing_columns(df)
    if missing:
        raise TableError("the findings need " + "; ".join(missing) + " (name columns with "
                         "--loss-col, --sparsity-col or --task-col NAME=COLUMN:KIND)")
    found, optima = findings.findings_and_optima(df, n_boot=args.bootstrap, seed=args.seed)
    print("\n".join(findings.findings_section(found, optima)).rstrip())
    if args.output is not None:
        atomic_write_text(Path(args.output), json.dumps(
            [f.to_dict() for f in found], indent=1, allow_nan=False) + "\n")
        print(f"findings: {args.output}")
    return 0


def _column_flags(p: argparse.ArgumentParser, *, full: bool) -> None:
    p.add_argument("--n-col", default=None,
                   help="parameter column (default n_params_total; or n_params_active)")
    p.add_argument("--d-col", default=None, help="tokens column (default tokens)")
    p.add_argument("--loss-col", default=None,
                   help="loss column (default val_loss; never replaced by another)")
    p.add_argument("--columns", default=None, metavar="FILE.toml",
                   help='column mapping: role = "column" lines (n, d, c, loss, sparsity, ...) '
                        'and [tasks.NAME] tables with loss = "column", kind = "reasoning"')
    p.add_argument("--where", default=None, metavar="EXPR",
                   help="use only the rows this pandas query selects")
    if full:
        p.add_argument("--c-col", default=None, help="compute column (default flops)")
        for role, what in (("sparsity", "sparsity s = 1 - k/E"), ("width", "model width"),
                           ("top-k", "experts per token"), ("n-experts", "experts"),
                           ("n-active", "active parameters"), ("tpp", "tokens per parameter")):
            p.add_argument(f"--{role}-col", default=None, help=f"{what} column")
        p.add_argument("--task-col", action="append", metavar="NAME=COLUMN[:KIND]",
                       help="a task loss column (KIND memorization|reasoning); repeatable")


def _force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="write figures into a directory that holds other files")


def register(subparsers) -> None:
    """Add ``fit``, ``predict``, ``plot`` and ``report`` to an argparse subparsers object."""
    _register_fit(subparsers)
    _register_predict(subparsers)
    p = subparsers.add_parser("plot", help="draw the paper figures (PNG and PDF)")
    p.add_argument("source", help="sweep directory or results table")
    p.add_argument("-o", "--output", required=True, help="figure directory")
    _force_flag(p)
    _column_flags(p, full=True)
    p.set_defaults(func=_plot)

    p = subparsers.add_parser("report", help="write a Markdown report: fits, optima, figures")
    p.add_argument("source", help="sweep directory or results table")
    p.add_argument("-o", "--output", default=None,
                   help="report.md (default); with --findings-only, FILE.json (optional)")
    p.add_argument("--fig-dir", default=None, help="default: figures/ next to the report")
    p.add_argument("--bootstrap", type=int, default=200, metavar="K",
                   help="resamples (the findings use at least 1000)")
    p.add_argument("--findings-only", action="store_true",
                   help="only the paper's findings: print them, and write -o FILE.json")
    p.add_argument("--seed", type=int, default=0)
    _force_flag(p)
    _column_flags(p, full=True)
    p.set_defaults(func=_report)


def _register_fit(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a scaling law (Approach 3) or IsoFLOP profiles "
                                          "(Approach 2) to a results table")
    p.add_argument("table", help="results table (.csv or .parquet) or a sweep directory")
    p.add_argument("--approach", type=int, choices=(2, 3), default=3,
                   help="3: parametric law L(N, D) (default); 2: IsoFLOP parabolas per budget")
    p.add_argument("--law", default="chinchilla", metavar="NAME",
                   help="chinchilla (default), fixed_data, or a registry law: chinchilla-tied, "
                        "kaplan, gadre-overtrain, clark-routed, krajewski-granularity, "
                        "ludziejewski-joint (docs/laws.md)")
    p.add_argument("--compare", default=None, metavar="LAW,LAW,...",
                   help="fit each law on the fit rows and score it on held-out rows "
                        "(--test-where, default: compute within 2x of the largest); "
                        "chooses the identified law with the lowest held-out error")
    p.add_argument("--n-experts-col", default=None, help="experts column (MoE laws)")
    p.add_argument("--granularity-col", default=None, help="granularity column (Krajewski)")
    _column_flags(p, full=False)
    p.add_argument("--c-col", default=None,
                   help="compute column: approach 2 groups budgets by it (default flops); "
                        "approach 3 derives D = C / (6 N) from it instead of --d-col")
    p.add_argument("--drop-highest", type=int, default=0, metavar="K",
                   help="drop the K highest-loss rows first (the reference fit drops 5)")
    p.add_argument("--test-where", default=None, metavar="EXPR",
                   help="hold these rows out: report predicted vs observed loss on them")
    p.add_argument("--bootstrap", type=int, default=None, metavar="K",
                   help="bootstrap resamples (default 100: the interval checks always run; "
                        "0 skips them and the verdict says 'not checked')")
    p.add_argument("--window", default=None, metavar="SPEC",
                   help="approach 2: fit each budget's parabola near its minimum: "
                        "loss:FRACTION (sizes within FRACTION of the budget's lowest loss), "
                        "nearest:K (the K sizes nearest it) or all (default loss:0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="fit.json")
    p.set_defaults(func=_fit)


def _register_predict(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predicted loss at (N, D, ...) from a fit.json, "
                                              "or the best allocation of a budget (--optimize)")
    p.add_argument("fit", help="fit.json written by `moe fit` (Approach 3 or a registry law)")
    p.add_argument("--n", type=float, default=None, help="parameters (the fitted kind of N)")
    p.add_argument("--d", type=float, default=None, help="tokens")
    p.add_argument("--e", type=float, default=None, help="experts (MoE laws)")
    p.add_argument("--g", type=float, default=None, help="granularity (krajewski-granularity)")
    p.add_argument("--s", type=float, default=None, help="sparsity 1 - k/E (abnar-sparsity)")
    p.add_argument("--optimize", action="store_true",
                   help="what to train with --flops C (and --memory M bytes): N_opt, D_opt, "
                        "and for MoE laws the best number of experts")
    p.add_argument("--flops", type=float, default=None, help="compute budget C (FLOPs)")
    p.add_argument("--memory", type=float, default=None, help="parameter memory limit (bytes)")
    p.add_argument("--bytes-per-param", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=1, help="experts per token (memory model)")
    p.add_argument("--expert-share", type=float, default=2.0 / 3.0,
                   help="share of active parameters in the routed experts (memory model)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_predict)

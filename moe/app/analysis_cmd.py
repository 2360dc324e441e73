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
    for role in ("sparsity", "width", "top_k", "n_experts", "n_active", "tpp"):
        flags[role] = getattr(args, f"{role}_col", None)
    tasks = [parse_task_flag(t) for t in getattr(args, "task_col", None) or []]
    if args.columns:
        return Columns.from_toml(args.columns, flags, tasks)
    return Columns.build(flags, tasks)


def _select(df, expr: str | None, flag: str):
    if expr is None:
        return df
    from moe.analysis.tables import TableError

    try:
        out = df.query(expr)
    except Exception as exc:  # pandas raises many types for a bad expression
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"{flag} {expr!r}: {first}") from None
    if out.empty:
        raise TableError(f"{flag} {expr!r} selects no rows")
    return out


def _fit(args: argparse.Namespace) -> int:
    from moe.analysis.tables import TableError, read_table
    from moe.io import atomic_write_text

    if args.bootstrap and args.bootstrap < 2:
        raise TableError(f"--bootstrap needs at least 2 resamples, got {args.bootstrap}")
    cols = _columns(args)
    df = read_table(args.table)
    test = _select(df, args.test_where, "--test-where") if args.test_where else None
    train = _select(df, args.where, "--where")
    if test is not None:
        train = train.drop(index=test.index, errors="ignore")
        if train.empty:
            raise TableError("--test-where leaves no rows to fit on")
    if args.approach == 2:
        record = _fit_approach2(train, cols, args, test)
    else:
        record = _fit_approach3(train, cols, args, test)
    record["selection"] = {"where": args.where, "test_where": args.test_where,
                           "table_rows": len(df), "fitted_rows": len(train)}
    summary, reason = record.pop("_summary"), record.pop("_reason")
    text = json.dumps(record, indent=2, allow_nan=False, default=float)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    _warn(record, f"approach {args.approach} fit")
    print(summary + (f" -> {args.output}" if args.output else ""))
    if not record["identified"]:
        print(f"not identified: {reason} (the numbers above are diagnostics, not findings)")
    return 0


def _fit_approach3(df, cols, args, test) -> dict:
    from moe.analysis import fit as fitmod
    from moe.analysis.bootstrap import bootstrap_fit

    kwargs = {"law": args.law, "n_col": cols.n, "d_col": cols.d, "loss_col": cols.loss,
              "c_col": args.c_col, "flops_col": None if args.c_col else cols.c,
              "drop_highest": args.drop_highest}
    if "c" not in cols.explicit and cols.c not in df:
        kwargs["flops_col"] = None
    data = fitmod.prepare(df, **kwargs)
    used = [cols.n, cols.loss] + ([args.c_col or cols.d] if args.law != "fixed_data" else [])
    _dropped(data.n_nan_dropped, used)
    result = fitmod.fit_data(data)
    record = {**result.to_dict(), "intervals": {}}
    if args.bootstrap:
        boot = bootstrap_fit(result, data, n_resamples=args.bootstrap, seed=args.seed)
        result = fitmod.with_bootstrap(result, data, boot)
        summary = boot.to_dict(with_samples=True)
        record.update(result.verdict.to_dict(), intervals=summary.pop("intervals"),
                      bootstrap=summary)
    if test is not None:
        kwargs.update(drop_highest=0, min_points=1)
        held = fitmod.prepare(test, **kwargs)
        _dropped(held.n_nan_dropped, used, "held-out ")
        record["test"] = fitmod.held_out(result, held)
    p = result.params
    record["_reason"] = result.verdict.reason
    record["_summary"] = (f"{args.law}: " + ", ".join(f"{k}={v:.4g}" for k, v in p.items())
                          + f"; objective={result.objective:.6g}; n={result.n_points} "
                          f"(N = {result.n_kind}); {result.seconds:.2f}s")
    if "test" in record:
        record["_summary"] += (f"; held-out mean |rel. error| "
                               f"{100 * record['test']['mean_abs_rel_error']:.2f}% on "
                               f"{record['test']['n_points']} row(s)")
    return record


def _fit_approach2(df, cols, args, test) -> dict:
    from moe.analysis import isoflop, records
    from moe.analysis.tables import TableError, used_columns

    if test is not None:
        raise TableError("--test-where needs --approach 3 (Approach 2 has no law to predict "
                         "with)")
    c_col = args.c_col or cols.c
    has_tokens = cols.d in df
    if not has_tokens and "d" in cols.explicit:
        raise TableError(f"column {cols.d!r} named by --d-col is not in the table")
    use = [cols.n, cols.loss, c_col] + ([cols.d] if has_tokens else [])
    values, keep = used_columns(df, use, purpose="Approach 2")
    _dropped(int((~keep).sum()), use)
    res = records.approach2(values[:, 0], values[:, 1], values[:, 2],
                            tokens=values[:, 3] if has_tokens else None,
                            window=isoflop.Window.parse(args.window) if args.window else None,
                            n_boot=args.bootstrap, seed=args.seed)
    n_kind = next((k for k in ("active", "total") if k in cols.n.lower()),
                  f"as given in column {cols.n!r}")
    record = {**res.to_dict(), "columns": {"n": cols.n, "loss": cols.loss, "c": c_col,
                                           **({"d": cols.d} if has_tokens else {})},
              "n_kind": n_kind,
              "compute": (f"C from {c_col!r}; D_opt = C / FLOPs-per-token(N_opt), FLOPs per "
                          f"token interpolated from {c_col!r} / {cols.d!r} at each budget"
                          if has_tokens else f"C from {c_col!r}; D_opt = C / (6 N_opt): the "
                          "table has no tokens column, so N is assumed to do all the compute")}
    if not has_tokens:
        record["warnings"].append(f"no tokens column {cols.d!r}: D_opt = C / (6 N_opt) assumes "
                                  "the fitted N does all the compute (wrong for MoE total N)")
    record["_reason"] = res.verdict.reason
    bias = res.bias.get("relative")
    record["_summary"] = (f"approach 2 (window {res.window.label}): a={_fmt(res.a)}, "
                          f"b={_fmt(res.b)}, N_opt = {_fmt(res.n_prefactor)} C^a, D_opt = "
                          f"{_fmt(res.d_prefactor)} C^b from {len(res.interior)} of "
                          f"{len(res.budgets)} budget(s) (N = {n_kind}); the method's bias on "
                          f"this grid: "
                          + ("n/a" if bias is None else f"{100 * bias:+.1f}% in a"))
    return record


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4g}"


def _dropped(count: int, columns, which: str = "") -> None:
    if count:
        print(f"dropped {count} {which}row(s) with NaN in {', '.join(map(repr, columns))}",
              file=sys.stderr)


def _predict(args: argparse.Namespace) -> int:
    from moe.analysis.predict import predict_from_record

    path = Path(args.fit)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no such fit file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    out = predict_from_record(record, args.n, args.d)
    _warn(record, f"fit {path}")
    if args.format == "json":
        print(json.dumps(out, allow_nan=False))
        return 0
    iv = out.get("interval")
    shown = f"loss = {out['loss']:.6g}"
    if iv:
        shown += f" ({100 * out['level']:.0f}% interval [{iv[0]:.6g}, {iv[1]:.6g}])"
    print(shown + ("" if out["identified"] else " (from a fit that is not identified: a "
                   "diagnostic, not a finding)"))
    return 0


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
    from moe.analysis.report import make_report
    from moe.analysis.tables import read_table

    cols = _columns(args)
    df = _select(read_table(args.source), args.where, "--where")
    path = make_report(cols.canonical(df), Path(args.output), args.fig_dir,
                       n_boot=args.bootstrap, seed=args.seed, source=str(args.source),
                       n_label=cols.n, force=args.force)
    print(f"report: {path}")
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
    p = subparsers.add_parser("fit", help="fit a scaling law (Approach 3) or IsoFLOP profiles "
                                          "(Approach 2) to a results table")
    p.add_argument("table", help="results table (.csv or .parquet) or a sweep directory")
    p.add_argument("--approach", type=int, choices=(2, 3), default=3,
                   help="3: parametric law L(N, D) (default); 2: IsoFLOP parabolas per budget")
    p.add_argument("--law", choices=("chinchilla", "fixed_data"), default="chinchilla")
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

    p = subparsers.add_parser("predict", help="predicted loss at (N, D) from a fit.json")
    p.add_argument("fit", help="fit.json written by `moe fit` (Approach 3)")
    p.add_argument("--n", type=float, required=True, help="parameters (the fitted kind of N)")
    p.add_argument("--d", type=float, default=None, help="tokens (chinchilla law)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("plot", help="draw the paper figures (PNG and PDF)")
    p.add_argument("source", help="sweep directory or results table")
    p.add_argument("-o", "--output", required=True, help="figure directory")
    _force_flag(p)
    _column_flags(p, full=True)
    p.set_defaults(func=_plot)

    p = subparsers.add_parser("report", help="write a Markdown report: fits, optima, figures")
    p.add_argument("source", help="sweep directory or results table")
    p.add_argument("-o", "--output", default="report.md")
    p.add_argument("--fig-dir", default=None, help="default: figures/ next to the report")
    p.add_argument("--bootstrap", type=int, default=200, metavar="K")
    p.add_argument("--seed", type=int, default=0)
    _force_flag(p)
    _column_flags(p, full=True)
    p.set_defaults(func=_report)

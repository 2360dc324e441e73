"""`moe sweep plan|launch|status|collect`, registered into the `moe` argparse CLI.

Each handler returns an exit code; user errors raise a `moe.errors.UserError` with a
one-line message, which `moe.app.cli.main` prints as `error: <msg>` with its exit code.
"""

from __future__ import annotations

import argparse
import sys

from moe.sweeps.executor import EXECUTORS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sweep` with its plan, launch, status and collect subcommands."""
    sweep = subparsers.add_parser("sweep", help="plan, launch, monitor and collect sweeps")
    sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="list every run with its size, tokens, FLOPs, GPU-hours "
                                    "(core-hours for a CPU estimate)")
    p.add_argument("spec", metavar="SWEEP.toml")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--cluster", metavar="PROFILE.toml",
                   help="take mfu and gpu_peak_tflops for GPU-hours from this profile")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("launch", help="start the runs that are not done or in flight")
    p.add_argument("spec", metavar="SWEEP.toml")
    p.add_argument("--dir", required=True, metavar="SWEEP_DIR")
    p.add_argument("--executor", choices=EXECUTORS, default="local")
    p.add_argument("--cluster", metavar="PROFILE.toml", help="cluster profile (slurm only)")
    p.add_argument("--max-parallel", type=int, default=2, metavar="N",
                   help="local executor: runs at once (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", help="state, progress, loss and failures of every run")
    p.add_argument("dir", metavar="SWEEP_DIR")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("collect", help="gather result.json files into one table")
    p.add_argument("dir", metavar="SWEEP_DIR")
    p.add_argument("-o", "--out", metavar="FILE.parquet|FILE.csv",
                   help="default SWEEP_DIR/results.parquet")
    p.set_defaults(func=cmd_collect)


def cmd_plan(args: argparse.Namespace) -> int:
    from moe.sweeps.plan import format_plan, plan, with_estimate
    from moe.sweeps.profile import load_profile
    from moe.sweeps.spec import load_spec

    spec = load_spec(args.spec)
    estimate = profile = None
    if args.cluster:
        profile = load_profile(args.cluster)
        estimate = with_estimate(spec, profile.mfu, profile.gpu_peak_tflops)
    device = (estimate or spec.estimate).device
    sys.stdout.write(format_plan(plan(spec, estimate, profile), args.format, device))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from moe.sweeps.launch import launch
    from moe.sweeps.profile import load_profile
    from moe.sweeps.spec import load_spec

    spec = load_spec(args.spec)
    profile = load_profile(args.cluster) if args.cluster else None
    report = launch(spec, args.dir, executor=args.executor, max_parallel=args.max_parallel,
                    progress=not args.no_progress, profile=profile)
    print(f"{len(report.submitted)} submitted, {len(report.skipped_done)} already done, "
          f"{len(report.skipped_in_flight)} still queued or running")
    if report.job_ids:
        arrays = sorted({j.split('_')[0] for j in report.job_ids.values()})
        print(f"slurm job array(s): {', '.join(arrays)}; follow with `moe sweep status {args.dir}`")
    for run_id, reason in report.unreadable:
        print(f"unreadable {run_id}: {reason}", file=sys.stderr)
    failed = sorted(r for r, s in report.final_states.items() if s != "done")
    failed += [r for r, _ in report.unreadable]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; see `moe sweep status "
              f"{args.dir}`", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from moe.sweeps.status import format_status, status

    sys.stdout.write(format_status(status(args.dir), args.format))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from moe.sweeps.collect import collect

    result = collect(args.dir, args.out)
    print(f"collected {len(result.table)} run(s) into {result.path}")
    for run_id, reason in result.skipped:
        print(f"skipped {run_id}: {reason}", file=sys.stderr)
    return 0

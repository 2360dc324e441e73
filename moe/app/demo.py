"""`moe demo`: the whole study loop on this machine, on the embedded pocket sweep.

plan -> launch (local executor, live progress) -> train + evaluate every run ->
collect -> fit -> figures -> report. Rerunning it reuses finished runs, so an
interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_DIR = Path("moe-demo")


def pocket_spec_path() -> Path:
    """The embedded pocket sweep: `sweeps/pocket.toml`, shipped in the `moe.sweeps` package."""
    import moe.sweeps

    return Path(moe.sweeps.__file__).resolve().parent / "pocket.toml"


def run_demo(sweep_dir: Path, *, spec_path: Path | None = None, max_parallel: int = 2,
             progress: bool = True) -> dict[str, Path]:
    """Run the demo into `sweep_dir`; returns the paths of what it made."""
    from moe.analysis.report import make_report
    from moe.sweepdir import SweepDir
    from moe.sweeps import collect, launch, load_spec, plan
    from moe.sweeps.plan import format_plan

    t0 = time.time()
    spec = load_spec(spec_path or pocket_spec_path())
    runs = plan(spec)
    print(f"[1/4] plan: {len(runs)} runs from {spec_path or pocket_spec_path()}")
    print(format_plan(runs, "table", spec.estimate.device))
    print(f"[2/4] launch: training and evaluating on this machine, {max_parallel} at a time "
          f"(finished runs are reused) -> {sweep_dir}")
    sweep = SweepDir(sweep_dir)
    report = launch(spec, sweep, executor="local", max_parallel=max_parallel,
                    progress=progress)
    failed = sorted(r for r, s in report.final_states.items() if s != "done")
    if report.skipped_done:
        print(f"      reused {len(report.skipped_done)} finished run(s)")
    if failed:
        print(f"      {len(failed)} run(s) failed: {', '.join(failed)} "
              f"(see `moe sweep status {sweep_dir}`)")
    table_path = sweep.results_path
    collected = collect(sweep, table_path)
    print(f"[3/4] collect: {len(collected.table)} runs -> {table_path}")
    report_path, fig_dir = sweep.report_path, sweep.figures_dir
    make_report(sweep, report_path, fig_dir)
    figures = sorted(fig_dir.glob("*.png"))
    print(f"[4/4] fit, figures and report -> {report_path}")
    for fig in figures:
        print(f"      {fig}")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return {"table": table_path, "report": report_path, "figures": fig_dir}


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.dir, spec_path=args.spec, max_parallel=args.max_parallel,
             progress=not args.quiet)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the main job: the pocket sweep on this machine, end to end",
        description=__doc__)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                   help=f"sweep directory (default: ./{DEFAULT_DIR})")
    p.add_argument("--spec", type=Path, default=None,
                   help="another sweep TOML instead of the built-in sweeps/pocket.toml")
    p.add_argument("--max-parallel", type=int, default=2, help="runs trained at once")
    p.add_argument("--quiet", action="store_true", help="no live progress display")
    p.set_defaults(func=_demo)

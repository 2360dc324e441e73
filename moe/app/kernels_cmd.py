"""`moe kernels compile`: ahead-of-time builds of the Triton kernels for GPU targets."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from moe.errors import MissingResource


def _compile(args) -> int:
    from moe.kernels import aot

    archs = aot.parse_archs(args.arch)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MissingResource("moe kernels compile needs Triton (it bundles ptxas): "
                         "pip install triton==3.9.0") from None
    builds = aot.build_all(archs, Path(args.out),
                           log=lambda line: print(line, file=sys.stderr))
    if args.format == "json":
        print(json.dumps([{**dataclasses.asdict(b), "spilled_bytes": b.spilled_bytes}
                          for b in builds], indent=1))
    else:
        print(aot.to_table(builds), end="")
    problems = [f"{b.kernel}.{b.config}.{b.arch}: {', '.join(b.problems)}"
                for b in builds if b.problems]
    if problems:
        print(f"error: {len(problems)} build(s) over budget: {'; '.join(problems)}",
              file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    """Add `kernels compile` to an argparse subparsers object."""
    kernels = subparsers.add_parser("kernels", help="Triton kernel builds")
    sub = kernels.add_subparsers(dest="kernels_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "compile", help="compile every Triton kernel and autotune config for GPU targets",
        description="Compile every Triton kernel with every autotune config for the given "
                    "targets, without a GPU (Triton's bundled ptxas); write the PTX as "
                    "<kernel>.<config>.<arch>.ptx and print registers, spilled bytes, shared "
                    "memory and tensor-core use. Exits 1 if any build spills registers or "
                    "needs more shared memory than the target has.")
    p.add_argument("--arch", default="sm_80,sm_90",
                   help="comma-separated: sm_80 (A100), sm_90 (H100/H200), sm_100 (B200)")
    p.add_argument("--out", required=True, help="directory for the PTX files")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=_compile)

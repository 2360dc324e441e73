"""`moe merge` and `moe ensemble`: recipes that read finished runs (`moe.recipes`)."""

from __future__ import annotations

import argparse
from pathlib import Path

DECAYS = ("mean", "linear", "cosine", "inv-sqrt", "1-sqrt")  # moe.recipes.DECAYS, torch-free


def register(subparsers) -> None:
    """Add `moe merge` and `moe ensemble` to the `moe` command."""
    p = subparsers.add_parser(
        "merge", help="merge a run's last snapshots with weights that emulate an LR decay",
        description="WSM checkpoint merging (Tian et al., ICLR 2026): average the snapshots "
                    "(train.save_every) of the last STEPS steps with the weights of Theorem 3.1 "
                    "for the chosen decay; writes a run directory for `moe eval`/`moe export`.")
    p.add_argument("run_dir", type=Path, help="a trained run with snapshots/")
    p.add_argument("--window", type=int, required=True, metavar="STEPS",
                   help="merge the snapshots of the last STEPS steps (boundary included)")
    p.add_argument("--decay", choices=DECAYS, default="mean", help="decay shape to emulate")
    p.add_argument("--out", type=Path, required=True, help="new run directory")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    _force_flag(p)
    p.set_defaults(func=_merge)

    p = subparsers.add_parser(
        "ensemble", help="evaluate the logit average of K runs beside each member",
        description="Validation and task losses of softmax(mean of the members' logits), on the "
                    "first member's validation batches and tasks, next to each member's.")
    p.add_argument("run_dirs", type=Path, nargs="+", help="trained runs (same tokenizer)")
    p.add_argument("--out", type=Path, required=True, help="directory for result.json")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    _force_flag(p)
    p.set_defaults(func=_ensemble)


def _force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="write into --out even when it holds other files (never over a run)")


def _merge(args: argparse.Namespace) -> int:
    from moe.recipes import merge_run

    r = merge_run(args.run_dir, window=args.window, decay=args.decay, out=args.out,
                  device=args.device, force=args.force)
    print(f"merged {r['merge.k'] + 1} snapshots (steps {r['merge.first_step']}..{r['steps']}) "
          f"-> {args.out}  val_loss={r['val_loss']:.4f} (last snapshot "
          f"{r['last/val_loss']:.4f})")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from moe.recipes import ensemble_runs

    r = ensemble_runs(args.run_dirs, args.out, device=args.device, force=args.force)
    print(f"ensemble of {r['ensemble.k']} -> {args.out}  val_loss={r['val_loss']:.4f} "
          f"(members: mean {r['val_loss_members_mean']:.4f}, best "
          f"{r['val_loss_members_best']:.4f})")
    return 0

"""`moe eval`: task losses and accuracies of a trained run."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from moe.config import RunConfig
from moe.errors import BadInput


def register(subparsers) -> None:
    """Add `moe eval` to the `moe` command."""
    p = subparsers.add_parser(
        "eval", help="task losses and accuracies of a trained run",
        description="Evaluate a run's newest checkpoint on tasks; results go to RUN_DIR/eval.json "
                    "and result.json (task/<name>/<metric> columns), or to --out alone. Under "
                    "torchrun each process evaluates every N-th item on its own copy of the "
                    "model and process 0 writes the results.")
    p.add_argument("run_dir", type=Path, nargs="?", help="run directory (with config.toml)")
    p.add_argument("--tasks", help="comma-separated task names (default: the run's eval.tasks, "
                                   "else the pocket tasks for a pocket run)")
    p.add_argument("--out", type=Path, help="write results to this JSON file instead")
    p.add_argument("--max-items", type=int, help="items per task (0 = all)")
    p.add_argument("--n-shots", type=int, help="few-shot examples (-1 = each task's default)")
    p.add_argument("--no-accuracy", action="store_true", help="task losses only (no generation)")
    p.add_argument("--batch-size", type=int, help="items per forward pass")
    p.add_argument("--samples", type=int, metavar="K",
                   help="also sample K answers per item and report task/<name>/maj@K")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--harness", metavar="TASKS",
                   help="run lm-evaluation-harness tasks (comma-separated) on the run's "
                        "transformers export instead (needs: pip install 'moe-sparsity[eval]')")
    p.add_argument("--harness-include", type=Path, metavar="DIR",
                   help="directory of extra lm-eval task YAML files (tasks on local data)")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    if args.list:
        from moe.tasks import get_task, list_tasks

        for name in list_tasks():
            t = get_task(name)
            print(f"{name:<20} {t.kind:<13} {t.n_shots}-shot  {t.description}")
        return 0
    if args.run_dir is None:
        raise BadInput("moe eval needs a RUN_DIR (or --list)")
    if args.harness:
        return _harness(args)
    import torch
    import torch.distributed as dist

    from moe.checkpoint import load_run_model
    from moe.data.tokenizer import tokenizer_for_data
    from moe.eval import EvalShard, evaluate_tasks, write_eval
    from moe.rundir import RunDir
    from moe.train.distributed import init_from_env

    cfg = _eval_config(RunDir(args.run_dir).read_config(), args)
    started = init_from_env(cfg.parallel.timeout_min)  # torchrun: each rank every W-th item
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        shard = EvalShard.current()
        model, _, step = load_run_model(args.run_dir, device=device)
        results = evaluate_tasks(model, tokenizer_for_data(cfg.data.source), cfg,
                                 device=device, progress=True, shard=shard)
        if shard.rank == 0:
            print(f"wrote {write_eval(args.run_dir, results, args.out, step=step)}")
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _harness(args: argparse.Namespace) -> int:
    from moe.export.harness import run_harness
    from moe.rundir import RunDir

    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = run_harness(args.run_dir, tasks, device=device, batch_size=args.batch_size or 8,
                      limit=args.max_items or None,
                      num_fewshot=None if args.n_shots in (None, -1) else args.n_shots,
                      include_path=args.harness_include)
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task:<20} {shown}")
    print(f"wrote {RunDir(args.run_dir).harness_path}")
    return 0


def _eval_config(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The run's config with the command line's task list and eval overrides."""
    if args.tasks:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    elif cfg.eval.tasks:
        tasks = cfg.eval.tasks
    elif cfg.data.source == "pocket":
        from moe.eval import POCKET_DEFAULT

        tasks = POCKET_DEFAULT
    else:
        raise BadInput("no tasks: pass --tasks (see `moe eval --list`)")
    overrides = {"tasks": tasks, "accuracy": cfg.eval.accuracy and not args.no_accuracy}
    for key in ("max_items", "n_shots", "batch_size", "samples"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return cfg.replace(eval=dataclasses.replace(cfg.eval, **overrides))

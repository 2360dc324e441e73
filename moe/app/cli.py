"""`moe`: the toolkit's one entry point. Subcommands are thin; the work lives in the packages."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from moe.config import load_config

    cfg = load_config(args.config, args.set or [])  # torch-free: a bad config fails in 0.2 s
    from moe.train import train_run
    from moe.train.distributed import init_from_env
    from moe.train.signals import Terminated

    owns_group = init_from_env(cfg.parallel.timeout_min)  # under torchrun: one rank
    try:
        result = train_run(cfg, args.out, progress=not args.quiet)
    except Terminated as exc:  # SIGTERM / SIGHUP: checkpointed and marked failed
        print(f"error: {exc} ({args.out})", file=sys.stderr)
        return exc.exit_code  # 128 + the signal number, as a shell reports it
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not result:  # ranks other than 0 return no record
        return 0
    print(f"done: {args.out}  train_loss={result.get('train_loss', float('nan')):.4f}  "
          f"val_loss={result.get('val_loss', float('nan')):.4f}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from moe.data.shards import prepare_shards

    meta = prepare_shards(args.inputs, args.out, tokenizer=args.tokenizer,
                          text_key=args.text_key, eos_token=args.eos_token,
                          shard_tokens=args.shard_tokens, workers=args.workers, progress=True,
                          force=args.force)
    print(f"wrote {meta['n_tokens']} tokens in {len(meta['shards'])} shard(s) to {args.out}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train one run (resumes if RUN_DIR has a checkpoint)")
    p.add_argument("config", type=Path, help="run config TOML ([model] [train] [data] [eval])")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_experts=16 (repeatable)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (a bar on a terminal, else a line every "
                        "log.progress_every_s seconds on stderr)")
    p.set_defaults(func=_train)

    p = sub.add_parser("data", help="token data")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("prepare", help="tokenise a corpus into token shards (streaming, "
                                            "parallel, resumable: rerun after a kill)")
    q.add_argument("inputs", nargs="+", help=".txt (blank-line separated), .jsonl(.gz|.zst), "
                                             ".parquet, or a `datasets` save_to_disk directory")
    q.add_argument("--out", required=True, type=Path, help="new shard directory")
    q.add_argument("--tokenizer", default="byte",
                   help='"byte" (built in) or a HuggingFace tokenizers JSON file')
    q.add_argument("--text-key", default="text", help="JSONL field holding the text")
    q.add_argument("--eos-token", default=None, help="end-of-text token of a tokenizer file")
    q.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file")
    q.add_argument("--workers", type=int, default=None,
                   help="tokenising processes (default: one per CPU; 0 = this process)")
    q.add_argument("--force", action="store_true",
                   help="write into --out even when it holds other files")
    q.set_defaults(func=_data_prepare)

    _register_optional(sub, _command(argv))
    return parser


# Subcommand modules (each has `register`). A module that imports torch or triton at import
# time is listed in _LAZY with the commands it registers and their help: it is imported only
# when one of its commands runs, so `moe fit`, `moe plot`, `moe --help` never load torch.
_MODULES = ("eval_cmd", "export_cmd", "sweep_cmd", "analysis_cmd", "bench", "kernels_cmd",
            "recipes_cmd", "demo")
_LAZY = {"bench": {"bench": "benchmarks (kernels, train)"}}


def _command(argv: list[str] | None) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    words = sys.argv[1:] if argv is None else argv
    return next((w for w in words if not w.startswith("-")), None)


def _register_optional(sub, command: str | None = None) -> None:
    """The other subcommands; modules in _LAZY get a stub unless their command runs."""
    import importlib

    for module in _MODULES:
        stubs = _LAZY.get(module, {})
        if stubs and command not in stubs:
            for name, help_text in stubs.items():
                sub.add_parser(name, help=help_text, add_help=False)
            continue
        importlib.import_module(f"moe.app.{module}").register(sub)


def main(argv: list[str] | None = None) -> int:
    """Run one command: its exit code, or the code of its failure (`moe.app.errors`), which is
    printed as one line; Python warnings are one line each too."""
    from moe.app.errors import format_warning, report

    parser = build_parser(argv)
    args = parser.parse_args(argv)
    default_format, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # one line and an exit code
        return report(exc)
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())

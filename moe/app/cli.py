"""`moe`: the toolkit's one entry point. Subcommands are thin; the work lives in the packages."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from moe.config import load_config
    from moe.train import train_run

    cfg = load_config(args.config, args.set or [])
    result = train_run(cfg, args.out, progress=not args.quiet)
    print(f"done: {args.out}  train_loss={result.get('train_loss', float('nan')):.4f}  "
          f"val_loss={result.get('val_loss', float('nan')):.4f}")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from moe.data.shards import prepare_shards

    meta = prepare_shards(args.inputs, args.out, tokenizer=args.tokenizer,
                          text_key=args.text_key, eos_token=args.eos_token)
    print(f"wrote {meta['n_tokens']} tokens in {len(meta['shards'])} shard(s) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train one run (resumes if RUN_DIR has a checkpoint)")
    p.add_argument("config", type=Path, help="run config TOML ([model] [train] [data] [eval])")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.n_experts=16 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("data", help="token data")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("prepare", help="tokenise .txt/.jsonl files into token shards")
    q.add_argument("inputs", nargs="+", help=".txt (blank-line separated) or .jsonl files")
    q.add_argument("--out", required=True, type=Path, help="new shard directory")
    q.add_argument("--tokenizer", default="byte",
                   help='"byte" (built in) or a HuggingFace tokenizers JSON file')
    q.add_argument("--text-key", default="text", help="JSONL field holding the text")
    q.add_argument("--eos-token", default=None, help="end-of-text token of a tokenizer file")
    q.set_defaults(func=_data_prepare)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """The other subcommands (each module of `moe.app` has `register`)."""
    import importlib

    for module in ("eval_cmd", "sweep_cmd", "analysis_cmd", "bench", "demo", "recipes_cmd"):
        importlib.import_module(f"moe.app.{module}").register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if os.environ.get("MOE_DEBUG"):
            raise
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

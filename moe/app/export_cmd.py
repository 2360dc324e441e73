"""`moe export`: a run as a transformers model directory (see `moe.export.hf`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add `moe export` to the `moe` command."""
    p = subparsers.add_parser(
        "export", help="export a run for transformers / vLLM / lm-eval",
        description="Write RUN_DIR's newest checkpoint as safetensors + config.json + tokenizer "
                    "(MoE runs as Mixtral, dense runs as Llama), loadable with "
                    "transformers.AutoModelForCausalLM.from_pretrained(OUT).")
    p.add_argument("run_dir", type=Path, help="run directory (with config.toml)")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: Hugging Face transformers")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight dtype in model.safetensors")
    p.add_argument("--force", action="store_true",
                   help="write into OUT even when it holds other files or another export")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from moe.export import export_hf

    out = export_hf(args.run_dir, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0

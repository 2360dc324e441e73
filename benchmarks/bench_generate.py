"""Generation speed on GSM8K-format items: the uncached reference path vs the KV-cached one.

    python benchmarks/bench_generate.py [--items 10] [--threads 2] [--d-model 64]
                                        [--uncached-budget 8]

Ten items in GSM8K's public schema (question / worked answer ending `#### N`, lengths
like the real test split) are written to a temporary MOE_TASK_DATA, and the
registered `gsm8k` task builds its own 4-shot prompts with its own generation
budget (256 tokens) and stop strings; a random-init model at seq_len 4096 (byte
tokenizer) rarely emits a stop string, so nearly every item runs its full budget.
The default model is pocket-tiny's architecture (d64, 2 layers, E8, k2) at
seq_len 4096.

The cached path runs the full budget. The uncached path (the reference, i.e. the
pre-cache code: the whole window re-run for every token) would take many minutes,
so it runs the first `--uncached-budget` tokens of every item; its cost per token
only grows with the window, so its tokens/s over those first tokens is an upper
bound on its full-budget speed. The cached path is also run at that short budget
to check that both produce the same tokens. Goal: >= 20x the uncached
tokens/s, 10 items in under 25 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from moe.config import DataConfig, ModelConfig
from moe.data.tokenizer import ByteTokenizer
from moe.eval.evaluate import encode_item
from moe.eval.generate import generate_ids
from moe.model import MoELM
from moe.tasks import get_task

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Mark"]
THINGS = ["clips", "pages", "apples", "dollars", "marbles", "cookies", "stamps", "tickets"]


def gsm8k_row(rng: random.Random) -> dict[str, str]:
    """A question and a worked solution with calculator annotations, GSM8K-sized."""
    who, what = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(12, 90), rng.randint(2, 9), rng.randint(3, 40)
    question = (f"{who} sold {what} to {a} of her friends in April, and then she sold {b} times "
                f"as many {what} in May as in April, minus {c} that were returned at the end of "
                f"the month. Each of the {what} was packed in a small box. How many {what} did "
                f"{who} sell altogether in April and May?")
    may = a * b - c
    answer = (f"In May {who} sold {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {what} before "
              f"returns.\nAfter returns she sold {a * b} - {c} = <<{a * b}-{c}={may}>>{may} in "
              f"May.\nAltogether she sold {a} + {may} = <<{a}+{may}={a + may}>>{a + may} {what}."
              f"\n#### {a + may}")
    return {"question": question, "answer": answer}


def write_task_data(root: Path, n_items: int) -> None:
    rng = random.Random(0)
    (root / "gsm8k").mkdir(parents=True)
    for split, n in (("test", n_items), ("train", 50)):
        rows = [gsm8k_row(rng) for _ in range(n)]
        (root / "gsm8k" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))


def prompts_and_budgets(seq_len: int):
    task = get_task("gsm8k")
    data = task.load(DataConfig())
    tok = ByteTokenizer()
    prompts = []
    for i, item in enumerate(data.items):
        shots = task.shots_for(item, i, data.shot_pool, task.n_shots)
        (enc,) = encode_item(task, tok, item, shots, (item.answer,), seq_len)
        prompts.append(enc.ids[: enc.start])
    return task, tok, prompts, [task.max_new_tokens] * len(prompts)


def run(model, task, tok, prompts, budgets, seq_len: int, use_cache: bool, batch_size: int):
    t0 = time.perf_counter()
    ids = generate_ids(model, prompts, budgets, tokenizer=tok, stop=task.stop, seq_len=seq_len,
                       batch_size=batch_size, use_cache=use_cache)
    wall_s = time.perf_counter() - t0
    n_tokens = sum(map(len, ids))
    return ids, {"path": "cached" if use_cache else "uncached", "budget": budgets[0],
                 "wall_s": round(wall_s, 2), "new_tokens": n_tokens,
                 "tokens_per_s": round(n_tokens / wall_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16, help="eval.batch_size")
    p.add_argument("--uncached-budget", type=int, default=8,
                   help="tokens per item for the uncached path (0 = skip it)")
    p.add_argument("-o", "--out", type=Path, help="also write the rows as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.d_model // 64,
                      n_experts=8, top_k=2, seq_len=args.seq_len)
    torch.manual_seed(0)
    model = MoELM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_task_data(Path(tmp), args.items)
        os.environ["MOE_TASK_DATA"] = tmp
        task, tok, prompts, budgets = prompts_and_budgets(args.seq_len)
    print(f"{args.items} gsm8k-format items, {task.n_shots}-shot, prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, budget {budgets[0]}, "
          f"stop {task.stop!r}; model d{args.d_model} L{args.n_layers} E8 k2 seq_len "
          f"{args.seq_len}; {args.threads} threads, {platform.machine()}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size)
    _, full = run(model, task, tok, prompts, budgets, use_cache=True, **kw)
    rows = [full]
    print(json.dumps(full))
    if args.uncached_budget:
        short = [min(b, args.uncached_budget) for b in budgets]
        ref_ids, ref = run(model, task, tok, prompts, short, use_cache=False, **kw)
        ids, cached = run(model, task, tok, prompts, short, use_cache=True, **kw)
        for row in (ref, cached):
            print(json.dumps(row))
        speedup = full["tokens_per_s"] / ref["tokens_per_s"]
        summary = {"speedup_tokens_per_s": round(speedup, 1), "identical_tokens": ids == ref_ids,
                   "uncached_full_budget_s_at_least": round(full["new_tokens"] /
                                                            ref["tokens_per_s"], 1)}
        print(json.dumps(summary))
        rows += [ref, cached, summary]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""`moe data prepare` throughput and memory vs the `tokenizers` library's own batch encoder.

    python benchmarks/bench_prepare.py [--mb 25 100] [--workers 2] [--vocab 8192]

A synthetic JSONL corpus (Zipf-distributed pseudo-words, 8-200 words a document)
is written at each size in `--mb`; a byte-level BPE tokenizer (`--vocab`) is
trained on its first megabytes. Every measurement runs in a fresh process and
reports its wall time, tokens/s and peak resident memory (ru_maxrss of the
process and, for prepare, its largest worker):

- `encode_batch`: the whole corpus read into a list, then ONE call of
  `tokenizers.Tokenizer.encode_batch` (and of `encode_batch_fast`), which use all
  cores through the library's own thread pool; only the call is timed;
- `prepare`: `moe.data.prepare.prepare_corpus` end to end (read, parse, tokenise
  in `--workers` processes, write fsynced shards).

Goal: prepare within 1.5x of encode_batch's time, memory flat in
corpus size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, mb: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "an", "el", "or", "us", "the", "ing"]
    vocab = ["".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(20000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    n_docs, size = 0, 0
    with open(path, "w") as f:
        while size < mb << 20:
            words = rng.choice(len(vocab), size=(256, 200), p=p)
            lens = rng.integers(8, 200, size=256)
            for row, n in zip(words, lens, strict=True):
                line = json.dumps({"text": " ".join(vocab[w] for w in row[:n]) + "."}) + "\n"
                f.write(line)
                size += len(line)
                n_docs += 1
    return n_docs


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, 20000)]
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))


def child_encode_batch(corpus: Path, tokenizer: Path, fast: bool) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line in f]
    fn = tok.encode_batch_fast if fast else tok.encode_batch
    t0 = time.perf_counter()
    encs = fn(texts, add_special_tokens=False)
    wall_s = time.perf_counter() - t0
    n_tokens = sum(len(e.ids) for e in encs) + len(texts)  # + one EOS per document, as prepare
    return {"wall_s": wall_s, "tokens": n_tokens}


def child_prepare(corpus: Path, tokenizer: Path, workers: int, out: Path,
                  shard_tokens: int) -> dict:
    from moe.data.prepare import prepare_corpus

    t0 = time.perf_counter()
    meta = prepare_corpus([corpus], out, tokenizer=str(tokenizer), workers=workers,
                          eos_token="<|endoftext|>", shard_tokens=shard_tokens)
    return {"wall_s": time.perf_counter() - t0, "tokens": meta["n_tokens"]}


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    kind, corpus, tokenizer = argv[0], Path(argv[1]), Path(argv[2])
    if kind == "prepare":
        row = child_prepare(corpus, tokenizer, int(argv[3]), Path(argv[4]), int(argv[5]))
    else:
        row = child_encode_batch(corpus, tokenizer, fast=kind == "encode_batch_fast")
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row.update(peak_rss_mb=round(self_mb), peak_worker_rss_mb=round(children_mb))
    print(json.dumps(row))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, nargs="+", default=[25, 100])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--shard-tokens", type=int, default=1 << 22,
                   help="shard size (memory is bounded by about 3 shards of tokens)")
    p.add_argument("--baseline-max-mb", type=int, default=25,
                   help="run encode_batch (whole corpus in memory) only up to this size")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; BPE vocab "
          f"{args.vocab}; prepare --workers {args.workers} --shard-tokens {args.shard_tokens}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mb in args.mb:
            corpus = tmp / f"corpus-{mb}.jsonl"
            n_docs = write_corpus(corpus, mb)
            tokenizer = tmp / "bpe.json"
            if not tokenizer.exists():
                train_tokenizer(corpus, tokenizer, args.vocab)
            kinds = ["encode_batch", "encode_batch_fast"] if mb <= args.baseline_max_mb else []
            for kind in [*kinds, "prepare"]:
                extra = ([str(args.workers), str(tmp / f"out-{mb}"), str(args.shard_tokens)]
                         if kind == "prepare" else [])
                row = run_child(kind, str(corpus), str(tokenizer), *extra)
                row = {"corpus_mb": mb, "docs": n_docs, "method": kind, **row,
                       "tokens_per_s": round(row["tokens"] / row["wall_s"])}
                row["wall_s"] = round(row["wall_s"], 2)
                print(json.dumps(row))


if __name__ == "__main__":
    main()

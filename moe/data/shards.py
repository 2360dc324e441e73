"""Token shards on disk (numpy memmaps) and deterministic batch sampling.

A shard directory holds `shard-00000.bin`, ... (raw uint16 when the vocabulary
fits, else uint32) and `meta.json` (dtype, tokenizer, token counts). Documents
are separated by the tokenizer's EOS id.

Sampling is a pure function of (seed, step): batch i draws its window starts
from `numpy.random.default_rng([seed, i])`, so the only data position a
checkpoint needs is the step, and a resumed run sees exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_for_data
from moe.io import atomic_write_bytes, atomic_write_json

SHARD_TOKENS = 1 << 26  # 64M tokens (128 MiB as uint16) per shard file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_documents(docs: Iterable[str], tok: Tokenizer) -> np.ndarray:
    """Concatenate documents, each followed by EOS, as one token array."""
    dtype = token_dtype(tok.vocab_size)
    parts = []
    for doc in docs:
        ids = tok.encode(doc)
        ids.append(tok.eos_id)
        parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def iter_text_documents(paths: list[Path], text_key: str = "text") -> Iterator[str]:
    """Documents from .txt files (blank-line separated) and .jsonl files (one object a line)."""
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input file not found: {path}")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise ValueError(f"{path}:{n} is not valid JSON") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                        raise ValueError(f"{path}:{n} has no string field {text_key!r} "
                                         "(choose it with --text-key)")
                    yield obj[text_key]
        else:
            text = path.read_text(encoding="utf-8")
            for doc in text.split("\n\n"):
                if doc.strip():
                    yield doc.strip()


def prepare_shards(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, *,
                   tokenizer: str = "byte", text_key: str = "text",
                   eos_token: str | None = None, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenise text/JSONL files into a shard directory; returns its meta.json."""
    out = Path(out_dir)
    if (out / "meta.json").exists():
        raise ValueError(f"{out} already holds shards (meta.json); choose a new --out directory")
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    dtype = token_dtype(tok.vocab_size)
    buffer: list[np.ndarray] = []
    shards, n_tokens, buffered = [], 0, 0

    def flush() -> None:
        nonlocal buffered
        name = f"shard-{len(shards):05d}.bin"
        arr = np.concatenate(buffer).astype(dtype)
        atomic_write_bytes(out / name, arr.tobytes())
        shards.append({"file": name, "tokens": int(arr.size)})
        buffer.clear()
        buffered = 0

    for doc in iter_text_documents([Path(p) for p in inputs], text_key):
        arr = encode_documents([doc], tok)
        buffer.append(arr)
        buffered += arr.size
        n_tokens += arr.size
        if buffered >= shard_tokens:
            flush()
    if buffered:
        flush()
    if not shards:
        raise ValueError("the input files hold no documents")
    tok_spec = "byte"
    if tokenizer != "byte":
        tok_spec = "tokenizer.json"
        atomic_write_bytes(out / tok_spec, Path(tokenizer).read_bytes())
    meta = {"format": 1, "dtype": dtype.name, "tokenizer": tok_spec, "eos_token": eos_token,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "n_tokens": n_tokens,
            "shards": shards}
    atomic_write_json(out / "meta.json", meta)
    return meta


def load_shards(directory: str | os.PathLike) -> list[np.ndarray]:
    """Memory-map every shard listed in meta.json."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    arrays = []
    for shard in meta["shards"]:
        arr = np.memmap(directory / shard["file"], dtype=np.dtype(meta["dtype"]), mode="r")
        if arr.size != shard["tokens"]:
            raise ValueError(f"{directory / shard['file']} has {arr.size} tokens, meta.json says "
                             f"{shard['tokens']}: the shard directory is damaged")
        arrays.append(arr)
    return arrays


@dataclass
class TokenSplit:
    """Random fixed-length windows from one or more token arrays (no window crosses arrays)."""

    arrays: list[np.ndarray]
    seq_len: int

    def __post_init__(self) -> None:
        self.starts = np.array([max(0, a.size - self.seq_len - 1) for a in self.arrays])
        self.cum = np.cumsum(self.starts)
        if self.cum.size == 0 or self.cum[-1] <= 0:
            raise ValueError(f"not enough tokens for one sequence of {self.seq_len + 1}")

    @property
    def n_tokens(self) -> int:
        return int(sum(a.size for a in self.arrays))

    def batch(self, seed: int, index: int, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of the stream seeded by `seed`: (inputs, targets) int64 [n, seq_len]."""
        rng = np.random.default_rng([seed, index])
        flat = rng.integers(0, self.cum[-1], size=n_seqs)
        which = np.searchsorted(self.cum, flat, side="right")
        offsets = flat - np.concatenate([[0], self.cum[:-1]])[which]
        rows = np.stack([self.arrays[w][o: o + self.seq_len + 1]
                         for w, o in zip(which, offsets, strict=True)])
        rows_t = torch.from_numpy(rows.astype(np.int64))
        return rows_t[:, :-1], rows_t[:, 1:]


@dataclass
class TokenData:
    train: TokenSplit
    val: TokenSplit
    tokenizer: Tokenizer


def split_arrays(arrays: list[np.ndarray], val_fraction: float) -> tuple[list, list]:
    """The last `val_fraction` of every array is validation."""
    train, val = [], []
    for arr in arrays:
        cut = int(arr.size * (1.0 - val_fraction))
        train.append(arr[:cut])
        val.append(arr[cut:])
    return train, val


def load_data(data_cfg, seq_len: int) -> TokenData:
    """Token data for a run: the pocket corpus (generated) or a shard directory."""
    from moe.data.curriculum import first_tokens, ordered_split
    from moe.data.pocket import build_pocket

    tok = tokenizer_for_data(data_cfg.source)
    if data_cfg.source == "pocket":
        arrays = [encode_documents(build_pocket(data_cfg).documents, tok)]
    else:
        arrays = load_shards(data_cfg.source)
    train, val = split_arrays(arrays, data_cfg.val_fraction)
    if data_cfg.unique_tokens:
        train = first_tokens(train, data_cfg.unique_tokens)
    train_split = TokenSplit(train, seq_len)
    if data_cfg.order == "ascending-quality":
        if data_cfg.source != "pocket":
            raise ValueError("data.order='ascending-quality' needs per-document quality scores, "
                             "which only the pocket corpus has (data.pocket_noise)")
        noise = build_pocket(data_cfg).noise
        train_split = ordered_split(train[0], -np.asarray(noise), tok.eos_id, seq_len)
    return TokenData(train=train_split, val=TokenSplit(val, seq_len), tokenizer=tok)

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe.data.prepare import check_token_ids, token_dtype
from moe.data.tokenizer import Tokenizer, tokenizer_for_data
from moe.errors import BadConfig, BadInput

SHARD_TOKENS = 1 << 26  # 64M tokens (128 MiB as uint16) per shard file


def encode_documents(docs: Iterable[str], tok: Tokenizer) -> np.ndarray:
    """Concatenate documents, each followed by EOS, as one token array."""
    dtype = token_dtype(tok.vocab_size)
    parts = []
    for doc in docs:
        ids = tok.encode(doc)
        ids.append(tok.eos_id)
        parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def prepare_shards(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, *,
                   tokenizer: str = "byte", text_key: str = "text",
                   eos_token: str | None = None, shard_tokens: int = SHARD_TOKENS,
                   workers: int | None = None, progress: bool = False,
                   force: bool = False) -> dict:
    """Tokenise a corpus into a shard directory, streaming and resumable
    (`moe.data.prepare`); returns its meta.json. A non-empty OUT_DIR that is not an
    unfinished prepare is refused unless `force`."""
    from moe.data.prepare import prepare_corpus

    return prepare_corpus(inputs, out_dir, tokenizer=tokenizer, text_key=text_key,
                          eos_token=eos_token, shard_tokens=shard_tokens, workers=workers,
                          progress=progress, force=force)


TOKEN_DTYPES = ("uint16", "uint32")
SAMPLE_TOKENS = 1 << 16
"""Token ids checked against the vocabulary per shard when loading (a fixed sample)."""


def read_meta(directory: Path) -> dict:
    """meta.json of a shard directory, validated: shard files inside the directory, dtype
    uint16 or uint32, integer token counts and vocabulary size."""
    path = directory / "meta.json"
    if not path.is_file():
        raise BadConfig(f"data.source={str(directory)!r} is neither 'pocket' nor a shard "
                         "directory with meta.json (create one with `moe data prepare`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadInput(f"{path} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise BadInput(f"{path} has no list of shards")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise BadInput(f"{path}: dtype {meta.get('dtype')!r} must be one of "
                         f"{', '.join(TOKEN_DTYPES)}")
    if not _is_count(meta.get("vocab_size")) or meta["vocab_size"] < 1:
        raise BadInput(f"{path}: vocab_size {meta.get('vocab_size')!r} must be a positive "
                         "integer")
    root = directory.resolve()
    tok = meta.get("tokenizer", "byte")
    if not isinstance(tok, str) or (tok != "byte" and (directory / tok).resolve().parent != root):
        raise BadInput(f"{path}: tokenizer {tok!r} must be \"byte\" or a file inside {directory}")
    for shard in meta["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not _is_count(shard.get("tokens")):
            raise BadInput(f"{path}: every shard needs a file name and a token count")
        target = (directory / name).resolve()
        if Path(name).is_absolute() or target.parent != root:
            raise BadInput(f"{path}: shard file {name!r} is outside the shard directory "
                             f"{directory}; only file names inside it are allowed")
    return meta


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_shards(directory: str | os.PathLike, vocab_size: int | None = None
                ) -> list[np.ndarray]:
    """Memory-map every shard listed in meta.json (validated), checking a sample of ids
    against meta.json's vocabulary (and `vocab_size`, the tokenizer's, when given)."""
    directory = Path(directory)
    meta = read_meta(directory)
    vocab = meta["vocab_size"] if vocab_size is None else min(vocab_size, meta["vocab_size"])
    arrays = []
    for shard in meta["shards"]:
        path = directory / shard["file"]
        arr = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        if arr.size != shard["tokens"]:
            raise BadInput(f"{path} has {arr.size} tokens, meta.json says "
                             f"{shard['tokens']}: the shard directory is damaged")
        check_token_ids(_sample(arr), vocab, str(path))
        arrays.append(arr)
    return arrays


def _sample(arr: np.ndarray) -> np.ndarray:
    """Its first and last tokens and a fixed random sample of the rest."""
    if arr.size <= SAMPLE_TOKENS:
        return np.asarray(arr)
    edge = SAMPLE_TOKENS // 4
    picks = np.random.default_rng(0).integers(0, arr.size, size=SAMPLE_TOKENS // 2)
    return np.concatenate([arr[:edge], arr[-edge:], arr[np.sort(picks)]])


@dataclass
class TokenSplit:
    """Random fixed-length windows from one or more token arrays (no window crosses arrays)."""

    arrays: list[np.ndarray]
    seq_len: int

    def __post_init__(self) -> None:
        self.starts = np.array([max(0, a.size - self.seq_len - 1) for a in self.arrays])
        self.cum = np.cumsum(self.starts)
        if self.cum.size == 0 or self.cum[-1] <= 0:
            raise BadInput(f"not enough tokens for one sequence of {self.seq_len + 1}")

    @property
    def n_tokens(self) -> int:
        return int(sum(a.size for a in self.arrays))

    def batch(self, seed: int, index: int, n_seqs: int, rows: slice | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of the stream seeded by `seed`: (inputs, targets) int64 [n, seq_len].

        `rows` picks some of the batch's n_seqs rows (a rank's or a micro-batch's share):
        they equal those rows of the whole batch.
        """
        rng = np.random.default_rng([seed, index])
        flat = rng.integers(0, self.cum[-1], size=n_seqs)[rows if rows is not None else slice(None)]
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

    if data_cfg.source != "pocket":
        read_meta(Path(data_cfg.source))  # validated before the tokenizer file it names is read
    tok = tokenizer_for_data(data_cfg.source)
    if data_cfg.source == "pocket":
        arrays = [encode_documents(build_pocket(data_cfg).documents, tok)]
    else:
        arrays = load_shards(data_cfg.source, vocab_size=tok.vocab_size)
    train, val = split_arrays(arrays, data_cfg.val_fraction)
    if data_cfg.unique_tokens:
        train = first_tokens(train, data_cfg.unique_tokens)
    train_split = TokenSplit(train, seq_len)
    if data_cfg.order == "ascending-quality":
        if data_cfg.source != "pocket":
            raise BadConfig("data.order='ascending-quality' needs per-document quality scores, "
                             "which only the pocket corpus has (data.pocket_noise)")
        noise = build_pocket(data_cfg).noise
        train_split = ordered_split(train[0], -np.asarray(noise), tok.eos_id, seq_len)
    return TokenData(train=train_split, val=TokenSplit(val, seq_len), tokenizer=tok)

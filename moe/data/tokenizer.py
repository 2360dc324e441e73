"""Tokenizers: a built-in byte-level tokenizer and HuggingFace `tokenizers` JSON files.

Both expose `encode(str) -> list[int]`, `decode(list[int]) -> str`,
`vocab_size`, `eos_id` (document separator) and `pad_id`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from moe.errors import BadConfig, BadInput, MissingResource


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then EOS = 256 and PAD = 257 (vocab 258).

    Needs no file, never fails on any text, and makes bits-per-byte equal to
    bits-per-token, which keeps the pocket configuration simple.
    """

    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HuggingFace `tokenizers` JSON file (e.g. a trained BPE)."""

    def __init__(self, path: str | os.PathLike, *, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise MissingResource("tokenizer files need the `tokenizers` package: "
                             "pip install tokenizers") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"tokenizer file not found: {self.path}")
        self._tok = _HF.from_file(str(self.path))
        self.name = str(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special_id(eos_token, ("<|endoftext|>", "</s>", "<eos>", "[SEP]"))
        pad = self._tok.token_to_id("<pad>")
        self.pad_id = self.eos_id if pad is None else pad

    def _special_id(self, given: str | None, candidates: tuple[str, ...]) -> int:
        for token in ([given] if given else list(candidates)):
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return tid
        raise BadInput(f"{self.path} has none of the end-of-text tokens "
                         f"{[given] if given else list(candidates)}; pass --eos-token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec: str | os.PathLike, *, eos_token: str | None = None) -> Tokenizer:
    """"byte" for the built-in tokenizer, else a path to a `tokenizers` JSON file."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)


def tokenizer_for_data(source: str) -> Tokenizer:
    """The tokenizer a data source was written with (pocket: bytes; shards: meta.json)."""
    if source == "pocket":
        return ByteTokenizer()
    meta_path = Path(source) / "meta.json"
    if not meta_path.is_file():
        raise BadConfig(f"data.source={source!r} is neither 'pocket' nor a shard directory with "
                         "meta.json (create one with `moe data prepare`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        spec = meta["tokenizer"]
    except (ValueError, KeyError, TypeError) as exc:  # not UTF-8, not JSON, no tokenizer
        raise BadInput(f"{meta_path} is not a shard directory's meta.json "
                         f"({type(exc).__name__}: {str(exc)[:80]})") from None
    if spec != "byte":
        spec = Path(source) / spec
    return load_tokenizer(spec, eos_token=meta.get("eos_token"))

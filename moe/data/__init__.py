"""Training data: tokenizers, token shards, and the synthetic pocket corpus."""

from moe.data.pocket import PocketCorpus, PocketItem, build_pocket
from moe.data.shards import TokenData, TokenSplit, load_data, prepare_shards
from moe.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "PocketCorpus", "PocketItem", "TokenData",
           "TokenSplit", "Tokenizer", "build_pocket", "load_data", "load_tokenizer",
           "prepare_shards"]

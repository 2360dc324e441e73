"""`moe.data.shards`: a shard directory's meta.json may name only files inside it, dtype
uint16 or uint32; token ids are checked against the vocabulary when preparing and on a
sample when loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe.config import DataConfig
from moe.data.shards import check_token_ids, load_data, load_shards, prepare_shards


@pytest.fixture
def shards(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"document {i}: " + "some words " * 40 for i in range(60)))
    out = tmp_path / "shards"
    prepare_shards([text], out, shard_tokens=4096)
    return out


def _edit_meta(directory, **changes):
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))
    return meta


def test_good_shards_load(shards):
    data = load_data(DataConfig(source=str(shards)), seq_len=16)
    assert data.train.n_tokens > 0


@pytest.mark.parametrize("where", ["../outside.bin", "ABSOLUTE", "sub/../../outside.bin"])
def test_shard_paths_outside_the_directory_are_refused(shards, where):
    outside = shards.parent / "outside.bin"
    outside.write_bytes(np.arange(5000, dtype=np.uint16).tobytes())
    name = str(outside) if where == "ABSOLUTE" else where
    _edit_meta(shards, shards=[{"file": name, "tokens": 5000}])
    with pytest.raises(ValueError, match="outside the shard directory"):
        load_shards(shards)


def test_tokenizer_file_outside_the_directory_is_refused(shards):
    _edit_meta(shards, tokenizer="../tokenizer.json")
    with pytest.raises(ValueError, match='must be "byte" or a file inside'):
        load_data(DataConfig(source=str(shards)), seq_len=16)


@pytest.mark.parametrize("dtype", ["float64", "int8", "uint8", "object", "<U2", None])
def test_only_uint16_and_uint32_tokens(shards, dtype):
    _edit_meta(shards, dtype=dtype)
    with pytest.raises(ValueError, match="must be one of uint16, uint32"):
        load_shards(shards)


def test_ids_outside_the_vocabulary_are_refused_when_loading(shards):
    meta = json.loads((shards / "meta.json").read_text())
    path = shards / meta["shards"][-1]["file"]
    ids = np.fromfile(path, dtype=np.uint16)
    ids[-1] = 60000  # beyond the byte tokenizer's 258 ids (the last token is always sampled)
    ids.tofile(path)
    with pytest.raises(ValueError, match="token id 60000, outside the vocabulary of 258"):
        load_data(DataConfig(source=str(shards)), seq_len=16)


def test_the_load_sample_covers_the_middle_of_big_shards(tmp_path):
    """A 1M-token shard with one bad id somewhere: the fixed sample finds a run of them."""
    from moe.data.shards import _sample

    ids = np.zeros(1 << 20, dtype=np.uint16)
    ids[300_000:340_000] = 999  # a damaged stretch of 40k tokens mid-file
    sample = _sample(ids)
    assert sample.size == 1 << 16
    with pytest.raises(ValueError, match="token id 999"):
        check_token_ids(sample, 258, "shard")


def test_malformed_meta_is_a_one_line_value_error(shards):
    (shards / "meta.json").write_text('{"shards": [{"file": "shard-00000.bin"}], "dtype": "uint16"')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_shards(shards)
    no_file = {"shards": [{"tokens": 3}], "dtype": "uint16", "vocab_size": 258}
    (shards / "meta.json").write_text(json.dumps(no_file))
    with pytest.raises(ValueError, match="needs a file name and a token count"):
        load_shards(shards)


def test_preparing_checks_every_id(tmp_path, monkeypatch):
    """A tokenizer whose ids exceed the vocabulary it reports writes no shard."""
    from moe.data.tokenizer import ByteTokenizer

    class Undersized(ByteTokenizer):
        vocab_size = 100  # "z" is byte 122

    monkeypatch.setattr("moe.data.prepare.load_tokenizer", lambda *a, **k: Undersized())
    text = tmp_path / "corpus.txt"
    text.write_text("abc\n\nxyz")
    with pytest.raises(ValueError, match="token id 256, outside the vocabulary of 100"):
        prepare_shards([text], tmp_path / "shards")
    assert not (tmp_path / "shards" / "meta.json").exists()
    assert not list((tmp_path / "shards").glob("*.bin"))
    check_token_ids(np.array([0, 99], dtype=np.uint16), 100, "x")

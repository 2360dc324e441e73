"""Data: the pocket corpus, tokenizers, shards and deterministic sampling."""

import json

import numpy as np
import pytest

from moe.app.cli import main
from moe.config import DataConfig
from moe.data import ByteTokenizer, build_pocket, load_data
from moe.data.shards import TokenSplit


def test_pocket_is_deterministic_and_separates_kinds():
    cfg = DataConfig(pocket_entities=30, pocket_arith_problems=100, pocket_eval_items=10)
    a, b = build_pocket(cfg), build_pocket(DataConfig(**{**cfg.__dict__}))
    assert a.documents == b.documents
    corpus = "\n".join(a.documents)
    for item in a.memorization_eval:  # every asked fact is in the corpus, in question form
        assert item.prompt + item.answer in corpus
    for item in a.reasoning_eval:  # no held-out problem is in the corpus
        assert item.prompt not in corpus
        assert item.answer.endswith(f"#### {item.target}")
    other = build_pocket(DataConfig(pocket_seed=7, pocket_entities=30,
                                    pocket_arith_problems=100, pocket_eval_items=10))
    assert other.documents != a.documents


def test_arithmetic_solutions_are_correct():
    corpus = build_pocket(DataConfig(pocket_entities=10, pocket_arith_problems=200,
                                     pocket_eval_items=50))
    for item in corpus.reasoning_eval + corpus.reasoning_train:
        value = None
        for step in item.answer.split("####")[0].strip().rstrip(".").split(". "):
            lhs, rhs = step.split(" = ")
            a, op, b = lhs.split(" ")
            assert value is None or int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert value == int(rhs)
        assert str(value) == item.target


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Zürich: 12 * 3 = 36 ✓"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.vocab_size == 258


def test_sampling_is_a_function_of_seed_and_step():
    split = TokenSplit([np.arange(1000, dtype=np.uint16), np.arange(50, dtype=np.uint16)], 16)
    x1, y1 = split.batch(3, 5, 4)
    x2, y2 = split.batch(3, 5, 4)
    assert (x1 == x2).all() and (y1[:, :-1] == x1[:, 1:]).all()
    assert not (split.batch(3, 6, 4)[0] == x1).all()


def test_prepare_shards_byte_and_bpe(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i} " * 5})
                             for i in range(50)))
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(src), "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["n_tokens"] > 1000
    data = load_data(DataConfig(source=str(out)), 32)
    assert data.tokenizer.name == "byte"
    x, _ = data.train.batch(0, 0, 2)
    assert "document number" in data.tokenizer.decode(x[0].tolist())
    # a HuggingFace BPE tokenizer file travels with the shards
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator([f"document number {i}" for i in range(50)], trainer)
    tok.save(str(tmp_path / "bpe.json"))
    out2 = tmp_path / "bpe-shards"
    assert main(["data", "prepare", str(src), "--out", str(out2),
                 "--tokenizer", str(tmp_path / "bpe.json")]) == 0
    data2 = load_data(DataConfig(source=str(out2)), 8)
    assert data2.tokenizer.vocab_size <= 80 and (out2 / "tokenizer.json").is_file()


def test_prepare_errors(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "input file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "--text-key" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "meta.json").exists()


@pytest.mark.parametrize("meta", [b"\xff\xfe not text", b'{"shards": []}', b"[1, 2"])
def test_damaged_meta_json_is_an_error_naming_it(tmp_path, meta):
    from moe.data.tokenizer import tokenizer_for_data

    (tmp_path / "meta.json").write_bytes(meta)
    with pytest.raises(ValueError, match=f"{tmp_path / 'meta.json'} is not a shard directory"):
        tokenizer_for_data(str(tmp_path))

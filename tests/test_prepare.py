"""Streaming `moe data prepare`: every input format, fixed-size shards equal to a dumb loop,
parallel equals serial, resumption after a crash or a kill, bounded memory."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moe.data.prepare import STATE, ShardWriter, prepare_corpus
from moe.data.shards import load_shards
from moe.data.tokenizer import ByteTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "número", "río", "日本", "x"]
    return [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(n)]


def reference_shards(docs: list[str], tok, shard_tokens: int) -> list[np.ndarray]:
    """The definition: each document's ids then EOS, concatenated, cut every shard_tokens."""
    stream = np.array([t for d in docs for t in [*tok.encode(d), tok.eos_id]], dtype=np.int64)
    return [stream[i: i + shard_tokens] for i in range(0, stream.size, shard_tokens)]


def shards_of(out: Path) -> list[np.ndarray]:
    return [a.astype(np.int64) for a in load_shards(out)]


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def write_inputs(tmp_path: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents in every supported format."""
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    paths = {"txt": tmp_path / "c.txt", "jsonl": tmp_path / "c.jsonl",
             "gz": tmp_path / "c.jsonl.gz", "zst": tmp_path / "c.jsonl.zst",
             "parquet": tmp_path / "c.parquet"}
    paths["txt"].write_text("\n\n".join(docs) + "\n")
    paths["jsonl"].write_text(lines)
    paths["gz"].write_bytes(gzip.compress(lines.encode()))
    zstandard = pytest.importorskip("zstandard")
    paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), paths["parquet"], row_group_size=37)
    return paths


def test_every_format_gives_the_reference_shards(tmp_path):
    docs = documents(300)
    want = reference_shards(docs, ByteTokenizer(), 4000)
    for name, path in write_inputs(tmp_path, docs).items():
        meta = prepare_corpus([path], tmp_path / f"out-{name}", shard_tokens=4000, workers=0,
                              batch_chars=500)
        assert_same(shards_of(tmp_path / f"out-{name}"), want)
        assert [s["tokens"] for s in meta["shards"][:-1]] == [4000] * (len(want) - 1)
        assert not (tmp_path / f"out-{name}" / STATE).exists()
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    prepare_corpus([tmp_path / "ds"], tmp_path / "out-ds", shard_tokens=4000, workers=0)
    assert_same(shards_of(tmp_path / "out-ds"), want)


def test_parallel_bpe_equals_serial_and_the_reference(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    docs = documents(400, seed=1)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator(docs, trainer)
    tok.save(str(tmp_path / "bpe.json"))
    src = write_inputs(tmp_path, docs)["jsonl"]
    want = reference_shards(docs, load_tokenizer(tmp_path / "bpe.json"), 777)
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        meta = prepare_corpus([src], out, tokenizer=str(tmp_path / "bpe.json"),
                              shard_tokens=777, workers=workers, batch_chars=2000)
        assert_same(shards_of(out), want)
        assert meta["tokenizer"] == "tokenizer.json"


def test_resumes_after_a_crash_with_identical_shards(tmp_path, monkeypatch):
    docs = documents(200, seed=2)
    src = write_inputs(tmp_path, docs)["jsonl"]
    want = reference_shards(docs, ByteTokenizer(), 2555)  # cuts fall inside documents
    real_store, calls = ShardWriter._store, []

    def crash_after_three(self, name, shard, state_json):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing the fourth shard
        calls.append(name)
        real_store(self, name, shard, state_json)

    monkeypatch.setattr(ShardWriter, "_store", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([src], tmp_path / "out", shard_tokens=2555, workers=0, batch_chars=300)
    state = json.loads((tmp_path / "out" / STATE).read_text())
    assert len(state["shards"]) == 3 and state["offset"] > 0
    monkeypatch.setattr(ShardWriter, "_store", real_store)
    with pytest.raises(ValueError, match="other inputs or options"):
        prepare_corpus([src], tmp_path / "out", shard_tokens=2556, workers=0)
    prepare_corpus([src], tmp_path / "out", shard_tokens=2555, workers=0, batch_chars=300)
    assert_same(shards_of(tmp_path / "out"), want)
    with pytest.raises(ValueError, match="already holds shards"):
        prepare_corpus([src], tmp_path / "out", shard_tokens=2555, workers=0)


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3 has no string field 'text'"):
        prepare_corpus([bad], tmp_path / "o1", workers=0)
    with pytest.raises(ValueError, match="unsupported input"):
        prepare_corpus([_touch(tmp_path / "x.csv")], tmp_path / "o2")


def test_a_directory_holding_other_files_is_refused_unless_forced(tmp_path, capsys):
    from moe.app.cli import main

    src = write_inputs(tmp_path, documents(20))["txt"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("someone's files")
    assert main(["data", "prepare", str(src), "--out", str(out), "--workers", "0"]) == 2
    assert str(out) in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    assert main(["data", "prepare", str(src), "--out", str(out), "--workers", "0",
                 "--force"]) == 0
    assert_same(shards_of(out), reference_shards(documents(20), ByteTokenizer(), 1 << 26))


def _touch(path: Path) -> Path:
    path.write_text("a,b\n")
    return path


_LIMITED = """
import os, resource, sys
from moe.data.prepare import prepare_corpus
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
limit = vm + (64 << 20)  # 64 MiB above the interpreter's footprint: less than the corpus
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
if sys.argv[1] == "read":
    try:
        open(sys.argv[2]).read()
    except MemoryError:
        sys.exit(3)
    sys.exit(0)
prepare_corpus([sys.argv[2]], sys.argv[3], shard_tokens=1 << 20, workers=2)
"""


@pytest.mark.slow
def test_corpus_larger_than_the_memory_limit_killed_and_resumed(tmp_path):
    base = [json.dumps({"text": d}) for d in documents(2000, seed=3)]
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:  # about 100 MB
        for i in range(500):
            f.write("".join(line.replace('"text": "', f'"text": "{i} ', 1) + "\n"
                            for line in base))
    assert src.stat().st_size > 96 << 20
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"}
    cmd = [sys.executable, "-c", _LIMITED]
    # The limit binds: reading the corpus into memory fails under it.
    assert subprocess.run([*cmd, "read", str(src)], env=env).returncode == 3
    out = tmp_path / "out"
    proc = subprocess.Popen([*cmd, "run", str(src), str(out)], env=env)
    state = out / STATE
    while proc.poll() is None:
        if state.is_file() and len(json.loads(state.read_text())["shards"]) >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "finished before it could be killed"
    assert not (out / "meta.json").exists()
    assert subprocess.run([*cmd, "run", str(src), str(out)], env=env).returncode == 0
    meta = json.loads((out / "meta.json").read_text())
    stream = np.concatenate([a.astype(np.int64) for a in load_shards(out)])
    assert meta["n_tokens"] == stream.size
    h = 0  # the reference, one document at a time (never the whole corpus as Python ints)
    with open(src) as f:
        for line in f:
            ids = np.frombuffer(json.loads(line)["text"].encode(), np.uint8)
            np.testing.assert_array_equal(stream[h: h + ids.size], ids)
            assert stream[h + ids.size] == ByteTokenizer.eos_id
            h += ids.size + 1
    assert h == stream.size
    assert all(s["tokens"] == 1 << 20 for s in meta["shards"][:-1])

"""`moe data prepare`: stream a corpus into fixed-size token shards, in parallel, resumably.

Inputs (documents, in order):

- `.txt`: documents separated by blank lines;
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object a line, text in `text_key`;
- `.parquet`: the `text_key` column, read a record batch at a time;
- a directory written by `datasets`' `save_to_disk` (its `train` split if it is a
  DatasetDict), read a batch at a time from its memory-mapped Arrow files.

Memory is bounded by one shard plus the batches in flight, whatever the corpus
size: the main process reads batches of documents (about `batch_chars`
characters each) and hands them to `workers` processes, at most two per worker
in flight; each worker parses and tokenises its batch with the `tokenizers` batch
API (`encode_batch`; bytes for the byte tokenizer) and returns the
ids with EOS after every document. Results are consumed in input order, so the
shards do not depend on the number of workers.

Shards hold exactly `shard_tokens` tokens (the last one fewer); a document may
continue in the next shard. Each shard is written atomically, and after it
`prepare-state.json` records the shards done and where the next one starts
(document index and token offset). A killed run started again with the same
inputs and options resumes there: documents before that point are read and
skipped without tokenising, and the shards come out identical to an
uninterrupted run's. `meta.json` (the format `moe.data.shards` loads) is written
last, and the state file removed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from moe.data.tokenizer import load_tokenizer
from moe.errors import BadInput, MissingResource
from moe.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    claim_output_dir,
    read_json,
)

STATE = "prepare-state.json"
_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- reading


def input_kind(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return suffix.lstrip(".")
    raise BadInput(f"{path}: unsupported input; use .txt, .jsonl(.gz|.zst), .parquet or a "
                     "`datasets` directory (save_to_disk)")


def _open_text(path: Path, kind: str) -> io.TextIOBase:
    if kind == "jsonl.gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if kind == "jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise MissingResource(f"{path}: .zst inputs need zstandard: "
                                  "pip install zstandard") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_docs(f: io.TextIOBase) -> Iterator[str]:
    lines: list[str] = []
    for line in itertools.chain(f, ["\n"]):
        if line in ("\n", "\r\n"):
            doc = "".join(lines).strip()
            lines.clear()
            if doc:
                yield doc
        else:
            lines.append(line)


def _datasets_batches(path: Path, text_key: str) -> Iterator[list]:
    try:
        import datasets
    except ImportError:
        raise MissingResource(f"{path} is a directory: reading a `datasets` dataset needs "
                         "pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise BadInput(f"{path} holds splits {sorted(ds)}; pass one split's directory")
        ds = ds["train"]
    if text_key not in ds.column_names:
        raise BadInput(f"{path} has no column {text_key!r} (choose it with --text-key)")
    for batch in ds.iter(batch_size=1024):
        yield batch[text_key]


def _records(path: Path, kind: str, text_key: str) -> Iterator[tuple[str, Any]]:
    """(kind, record) per document: a raw JSON line, or a document's text."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as pf:
            if text_key not in pf.schema_arrow.names:
                raise BadInput(f"{path} has no column {text_key!r} (choose it with --text-key)")
            for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
                yield from (("text", t) for t in batch.column(0).to_pylist())
    elif kind == "datasets":
        for texts in _datasets_batches(path, text_key):
            yield from (("text", t) for t in texts)
    else:
        with _open_text(path, kind) as f:
            if kind == "txt":
                yield from (("text", d) for d in _txt_docs(f))
            else:  # JSON is parsed by the workers; the line number travels for errors
                yield from (("json", (n, line)) for n, line in enumerate(f, 1) if line.strip())


def iter_jobs(paths: list[Path], text_key: str, batch_chars: int,
              skip_docs: int = 0) -> Iterator[tuple]:
    """Batches of about batch_chars characters: (path, text_key, [(kind, record), ...])."""
    seen = 0
    for path in paths:
        batch: list[tuple[str, Any]] = []
        size = 0
        for rec in _records(path, input_kind(path), text_key):
            seen += 1
            if seen <= skip_docs:
                continue
            batch.append(rec)
            size += len(rec[1]) if rec[0] == "text" else len(rec[1][1])
            if size >= batch_chars:
                yield str(path), text_key, batch
                batch, size = [], 0
        if batch:
            yield str(path), text_key, batch


# --------------------------------------------------------------------------- tokenising


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """ValueError when any id in `ids` is outside [0, vocab_size) (for preparing and loading)."""
    if ids.size and int(ids.max()) >= vocab_size:
        bad = int(ids.max())
        raise BadInput(f"{where} holds token id {bad}, outside the vocabulary of {vocab_size} "
                         "ids: the shards do not match their tokenizer")


class BatchEncoder:
    """Documents -> (ids with EOS after each document, tokens per document)."""

    def __init__(self, spec: str, eos_token: str | None):
        tok = load_tokenizer(spec, eos_token=eos_token)
        self.eos_id, self.dtype = tok.eos_id, token_dtype(tok.vocab_size)
        self.hf = None
        if spec != "byte":
            from tokenizers import Tokenizer

            self.hf = Tokenizer.from_file(str(spec))

    def __call__(self, job: tuple) -> tuple[np.ndarray, np.ndarray]:
        path, text_key, records = job
        texts = [_text_of(path, text_key, kind, rec) for kind, rec in records]
        if self.hf is None:
            seqs = [t.encode("utf-8") for t in texts]
        else:
            seqs = [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        lens = np.fromiter((len(s) + 1 for s in seqs), dtype=np.int64, count=len(seqs))
        ids = np.empty(int(lens.sum()), dtype=self.dtype)
        ends = np.cumsum(lens)
        ids[ends - 1] = self.eos_id
        for s, end in zip(seqs, ends, strict=True):
            ids[end - 1 - len(s): end - 1] = np.frombuffer(s, np.uint8) if isinstance(
                s, bytes) else s
        return ids, lens


def _text_of(path: str, text_key: str, kind: str, rec: Any) -> str:
    if kind == "text":
        if not isinstance(rec, str):
            raise BadInput(f"{path}: a {text_key!r} value is {type(rec).__name__}, not text")
        return rec
    n, line = rec
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise BadInput(f"{path}:{n} is not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
        raise BadInput(f"{path}:{n} has no string field {text_key!r} (choose it with --text-key)")
    return obj[text_key]


_WORKER: BatchEncoder | None = None


def _init_worker(spec: str, eos_token: str | None) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = BatchEncoder(spec, eos_token)


def _encode_in_worker(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER(job)


@contextlib.contextmanager
def encoded_batches(jobs: Iterator[tuple], spec: str, eos_token: str | None, workers: int):
    """The jobs' results in order; at most 2 x workers batches in flight (0 = this process)."""
    if workers == 0:
        yield map(BatchEncoder(spec, eos_token), jobs)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method),
                               initializer=_init_worker, initargs=(spec, eos_token))
    try:
        yield _bounded(pool, jobs, 2 * workers)
    except BrokenProcessPool:
        raise MissingResource("a tokenising worker process died (out of memory?); rerun the same "
                         "command to resume, with fewer --workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _bounded(pool, jobs: Iterator[tuple], depth: int) -> Iterator[tuple]:
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_encode_in_worker, job))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------------- shards


class ShardWriter:
    """Cuts the token stream into shards of exactly `shard_tokens`, recording where each ends.

    The buffer starts at token `offset` of document `next_doc`; `lens_D` are the token
    counts of the documents in it, so the position after any cut is known exactly.
    """

    def __init__(self, out: Path, shard_tokens: int, state: dict[str, Any], vocab_size: int):
        self.out, self.shard_tokens, self.state = out, shard_tokens, state
        self.vocab_size = vocab_size
        self.parts: list[np.ndarray] = []
        self.n_buffered = 0
        self.lens_D = np.zeros(0, dtype=np.int64)
        # One background thread writes (and fsyncs) a shard, then the state that lists it,
        # while the next shard is tokenised; at most one write is in flight.
        self._io = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def add(self, ids: np.ndarray, lens_D: np.ndarray) -> None:
        self.parts.append(ids)
        self.n_buffered += ids.size
        self.lens_D = np.concatenate([self.lens_D, lens_D])
        while self.n_buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def finish(self) -> None:
        if self.n_buffered:
            self._write(self.n_buffered)
        self._wait()

    def close(self) -> None:
        """Wait for the write in flight (re-raising its error)."""
        try:
            self._wait()
        finally:
            self._io.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _write(self, count: int) -> None:
        buffer = np.concatenate(self.parts)
        rest = buffer[count:]
        self.parts, self.n_buffered = ([rest] if rest.size else []), rest.size
        shards = self.state["shards"]
        name = f"shard-{len(shards):05d}.bin"
        check_token_ids(buffer[:count], self.vocab_size, str(self.out / name))
        shards.append({"file": name, "tokens": int(count)})
        self._advance(count)
        self._wait()
        self._pending = self._io.submit(self._store, name, buffer[:count], json.dumps(self.state))

    def _store(self, name: str, shard: np.ndarray, state_json: str) -> None:
        atomic_write_bytes(self.out / name, memoryview(shard))  # no copy of the shard
        atomic_write_text(self.out / STATE, state_json)

    def _advance(self, count: int) -> None:
        ends_D = np.cumsum(self.lens_D) - self.state["offset"]
        done = int(np.searchsorted(ends_D, count, side="right"))  # documents wholly written
        if done == 0:
            self.state["offset"] += count
        else:
            self.state["offset"] = int(count - ends_D[done - 1])
            self.state["next_doc"] += done
            self.lens_D = self.lens_D[done:]


def _fingerprint(paths: list[Path], tokenizer: str, text_key: str, eos_token: str | None,
                 shard_tokens: int) -> dict[str, Any]:
    """What must not change between a killed run and its resumption."""
    def stat(p: Path) -> list:
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        return [str(p.resolve()), sum(f.stat().st_size for f in files if f.is_file()),
                max((f.stat().st_mtime_ns for f in files if f.is_file()), default=0)]

    tok = "byte" if tokenizer == "byte" else stat(Path(tokenizer))
    return {"inputs": [stat(p) for p in paths], "tokenizer": tok, "text_key": text_key,
            "eos_token": eos_token, "shard_tokens": shard_tokens}


def _start_state(out: Path, fingerprint: dict[str, Any], itemsize: int,
                 force: bool = False) -> dict[str, Any]:
    """A fresh state, or the one a killed run left (its shards checked). Any other
    non-empty directory is refused unless `force` (`moe.io.check_output_dir`)."""
    if (out / "meta.json").exists():
        raise BadInput(f"{out} already holds shards (meta.json); choose a new --out directory")
    check_output_dir(out, "data prepare", force=force or (out / STATE).is_file())
    for tmp in out.glob(".shard-*.tmp"):  # a kill mid-write leaves its temporary file
        tmp.unlink(missing_ok=True)
    state = read_json(out / STATE)
    if state is None:
        return {"fingerprint": fingerprint, "shards": [], "next_doc": 0, "offset": 0}
    if state.get("fingerprint") != fingerprint:
        raise BadInput(f"{out} holds an unfinished prepare of other inputs or options; "
                         "rerun it with the same ones, or choose a new --out directory")
    for shard in state["shards"]:
        path = out / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
            raise BadInput(f"{path} is missing or damaged; choose a new --out directory")
    return state


def prepare_corpus(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, *,
                   tokenizer: str = "byte", text_key: str = "text",
                   eos_token: str | None = None, shard_tokens: int = 1 << 26,
                   workers: int | None = None, batch_chars: int = 1 << 20,
                   progress: bool = False, force: bool = False) -> dict[str, Any]:
    """Tokenise the inputs into OUT_DIR's shards (resuming a killed run); returns meta.json."""
    out = Path(out_dir)
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise BadInput(f"input file not found: {p}")
        input_kind(p)
    if shard_tokens <= 0:
        raise BadInput(f"shard_tokens={shard_tokens} must be positive")
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    state = _start_state(out, _fingerprint(paths, tokenizer, text_key, eos_token, shard_tokens),
                         token_dtype(tok.vocab_size).itemsize, force)
    claim_output_dir(out, "data prepare", force=True)  # checked above
    writer = ShardWriter(out, shard_tokens, state, tok.vocab_size)
    jobs = iter_jobs(paths, text_key, batch_chars, skip_docs=state["next_doc"])
    n_workers = (os.cpu_count() or 1) if workers is None else workers
    skip = state["offset"]
    with encoded_batches(jobs, tokenizer, eos_token, n_workers) as results, \
            _progress(progress, sum(s["tokens"] for s in state["shards"])) as bar:
        try:
            for ids, lens_D in results:
                if skip:  # resuming inside a document: its first tokens are in the last shard
                    ids, skip = ids[skip:], 0
                writer.add(ids, lens_D)
                bar.update(ids.size)
            writer.finish()
        finally:
            writer.close()
    if not state["shards"]:
        raise BadInput("the input files hold no documents")
    return _write_meta(out, tok, tokenizer, eos_token, state)


def _write_meta(out: Path, tok, tokenizer: str, eos_token: str | None,
                state: dict[str, Any]) -> dict[str, Any]:
    tok_spec = "byte"
    if tokenizer != "byte":
        tok_spec = "tokenizer.json"
        atomic_write_bytes(out / tok_spec, Path(tokenizer).read_bytes())
    meta = {"format": 1, "dtype": token_dtype(tok.vocab_size).name, "tokenizer": tok_spec,
            "eos_token": eos_token, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "n_tokens": sum(s["tokens"] for s in state["shards"]), "shards": state["shards"],
            "shard_tokens": state["fingerprint"]["shard_tokens"]}
    atomic_write_json(out / "meta.json", meta)
    (out / STATE).unlink(missing_ok=True)
    return meta


@contextlib.contextmanager
def _progress(enabled: bool, initial: int):
    from tqdm.auto import tqdm

    bar = tqdm(initial=initial, unit="tok", unit_scale=True, disable=not enabled,
               dynamic_ncols=True, desc="tokenising")
    try:
        yield bar
    finally:
        bar.close()

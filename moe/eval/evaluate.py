"""Task evaluation: task losses (the paper's metric) and accuracies, in-run and standalone.

**Task loss.** For each item the prompt is the task's few-shot examples (drawn
deterministically from its train split, see `moe.tasks`) followed by the
item's question; the model is scored on the gold answer. The sequence is
`[EOS] + encode(prompt + answer)`, tokenised jointly (as in training, a
document starts after an EOS), and the answer span starts at the first token
whose text reaches past the prompt: found by decoding prefixes, so it is exact
for any tokenizer, and a token that straddles the boundary counts as an
answer token. Only answer tokens are scored. A task reports the summed negative
log-likelihood over all its items divided by

- the number of answer tokens: `loss` (nats per token) and `bits_per_token`;
- the UTF-8 bytes of the answers, in bits: `bits_per_byte` (tokenizer-independent).

**Context.** When prompt + answer exceed `model.seq_len`, the earliest shots are
dropped first, then tokens from the left; an answer that alone does not fit is
an error. Batches are right-padded: the model is causal, so padding after a
sequence cannot change its scores, and batched equals one-at-a-time.

**Accuracy.** Greedy generation (no sampling, KV-cached: `moe.eval.generate`)
from the same prompt, stopped at EOS, at the task's stop strings, or after its
token budget, then judged by the task (final number, alias match, exact match).
Multiple-choice tasks (HellaSwag) instead pick the choice with the highest
log-likelihood per character (lm-eval's acc_norm).

**Self-consistency.** With `eval.samples = K > 0` (generation tasks, with
`eval.accuracy` on), K more answers per item are sampled (`eval.temperature`,
`eval.top_p`, `eval.seed`); the most frequent final answer (the task's
`vote_key`: the final number for GSM8K-like tasks; the earliest sample wins a
tie; samples without an answer do not vote) is judged, giving `maj@K` (Wang et
al. 2023) beside the greedy `accuracy`.

Results: `evaluate_tasks` -> {task: {kind, loss, bits_per_token, bits_per_byte,
accuracy, n_items[, maj@K]}}; `write_eval` stores them in the run's eval.json and as
flat `task/<name>/<metric>` keys in its result.json.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.config import EvalConfig, RunConfig
from moe.data.tokenizer import Tokenizer
from moe.errors import BadConfig, BadInput
from moe.eval.generate import (
    Sampling,
    batches_by_length,
    generate_texts,
    generation_autocast,
    greedy_generate,
)
from moe.eval.shard import EvalShard, Lockstep
from moe.io import atomic_write_json
from moe.model import IGNORE_INDEX
from moe.model import precision as precision_policy
from moe.rundir import RunDir
from moe.tasks import Task, TaskData, TaskItem, get_task

METRICS = ("kind", "loss", "bits_per_token", "bits_per_byte", "accuracy", "n_items")
POCKET_DEFAULT = ("pocket-memorization", "pocket-reasoning")


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """One scored sequence: token ids with the answer span ids[start:]."""

    ids: tuple[int, ...]
    start: int
    """Index of the first answer token (>= 1: every answer token has a predecessor)."""
    n_bytes: int
    """UTF-8 bytes of the answer text."""

    @property
    def n_answer_tokens(self) -> int:
        return len(self.ids) - self.start


# --------------------------------------------------------------------------- encoding


def answer_start(tokenizer: Tokenizer, ids: list[int], n_prompt_chars: int) -> int:
    """Index of the first token of `ids` whose decoded prefix reaches past the prompt."""
    lo, hi = 0, len(ids)  # binary search: prefix length grows with the number of tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1])) > n_prompt_chars:
            hi = mid
        else:
            lo = mid + 1
    if lo == len(ids):
        raise BadInput("the answer encodes to no tokens")
    return lo


def encode_pair(tokenizer: Tokenizer, prompt: str, answer: str, seq_len: int) -> Encoded:
    """`[EOS] + encode(prompt + answer)`, cut from the left to seq_len + 1 tokens."""
    body = tokenizer.encode(prompt + answer)
    start = answer_start(tokenizer, body, len(prompt)) + 1
    ids = [tokenizer.eos_id, *body]
    excess = len(ids) - (seq_len + 1)  # a forward pass sees seq_len inputs, scores their next
    if excess > 0:
        if start - excess < 1:
            raise BadInput(f"an answer of {len(ids) - start} tokens does not fit "
                             f"model.seq_len={seq_len}: {answer[:40]!r}...")
        ids, start = ids[excess:], start - excess
    return Encoded(ids=tuple(ids), start=start, n_bytes=len(answer.encode("utf-8")))


def encode_item(task: Task, tokenizer: Tokenizer, item: TaskItem, shots: list[TaskItem],
                continuations: tuple[str, ...], seq_len: int) -> list[Encoded]:
    """Each continuation after one shared context, dropping the earliest shots to fit."""
    longest = max(continuations, key=len)
    for k in range(len(shots), -1, -1):
        prompt = task.context(item, shots[len(shots) - k:])
        if k == 0 or len(tokenizer.encode(prompt + longest)) + 1 <= seq_len + 1:
            break
    return [encode_pair(tokenizer, prompt, c, seq_len) for c in continuations]


# --------------------------------------------------------------------------- scoring


def answer_logprobs(model: torch.nn.Module, examples: list[Encoded], *, batch_size: int,
                    pad_id: int, device: torch.device | str = "cpu") -> list[float]:
    """Summed log-probability (nats) of each example's answer tokens."""
    out = [0.0] * len(examples)
    for chunk in batches_by_length([len(e.ids) for e in examples], batch_size):
        T = max(len(examples[i].ids) for i in chunk) - 1
        idx_BT = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        tgt_BT = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids, s = torch.tensor(examples[i].ids), examples[i].start
            idx_BT[r, : len(ids) - 1] = ids[:-1]
            tgt_BT[r, s - 1: len(ids) - 1] = ids[s:]  # position t predicts token t + 1
        logits_BTV = model(idx_BT.to(device)).logits_BTV
        mask_BT = (tgt_BT != IGNORE_INDEX).to(device)
        logp_NV = torch.log_softmax(logits_BTV[mask_BT].float(), dim=-1)  # answer positions only
        tok_lp_N = logp_NV.gather(1, tgt_BT.to(device)[mask_BT].unsqueeze(1)).squeeze(1)
        row_N = torch.arange(len(chunk), device=device).unsqueeze(1).expand_as(mask_BT)[mask_BT]
        sums_B = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        sums_B.index_add_(0, row_N, tok_lp_N.double())
        for i, value in zip(chunk, sums_B.tolist(), strict=True):
            out[i] = value
    return out


# --------------------------------------------------------------------------- tasks


def evaluate_task(model: torch.nn.Module, tokenizer: Tokenizer, task: Task, data: TaskData,
                  eval_cfg: EvalConfig, seq_len: int, device: torch.device | str = "cpu",
                  shard: EvalShard | None = None, precision: str = "auto") -> dict[str, Any]:
    """One task's metrics (see the module docstring); the model must be in eval mode.

    Scoring and generation run in the run's `precision` (`moe.model.precision`), as its
    training did. With a `shard` of W > 1 ranks every rank calls this with the same
    arguments: each evaluates its items (`moe.eval.shard`) and every rank returns the
    metrics of all.
    """
    shard, device = shard or EvalShard(), torch.device(device)
    n_shots = task.n_shots if eval_cfg.n_shots < 0 else eval_cfg.n_shots
    multiple_choice = eval_cfg.accuracy and bool(data.items[0].choices)
    mine = shard.items(len(data.items))
    groups: list[list[Encoded]] = []
    for i in mine:
        item = data.items[i]
        shots = task.shots_for(item, i, data.shot_pool, n_shots)
        conts = item.choices if multiple_choice else (item.answer,)
        groups.append(encode_item(task, tokenizer, item, shots, conts, seq_len))
    with precision_policy.autocast(precision, device):
        logps = iter(answer_logprobs(model, [e for g in groups for e in g],
                                     batch_size=eval_cfg.batch_size, pad_id=tokenizer.pad_id,
                                     device=device))
    _drain(model, precision_policy.autocast(precision, device))
    records = []
    for i, g in zip(mine, groups, strict=True):
        item = data.items[i]
        gold = g[item.label if multiple_choice else 0]
        records.append({"index": i, "logps": [next(logps) for _ in g],
                        "n_tokens": gold.n_answer_tokens, "n_bytes": gold.n_bytes,
                        "prompt": gold.ids[: gold.start]})
    generative = eval_cfg.accuracy and not multiple_choice
    if generative:
        items = [data.items[r["index"]] for r in records]
        for r, ok in zip(records, _generation_hits(model, tokenizer, task, items, records,
                                                   seq_len, eval_cfg.batch_size, device,
                                                   precision), strict=True):
            r["correct"] = ok
        _drain(model, generation_autocast(device, precision))
        if eval_cfg.samples:
            for r, ok in zip(records, _majority_hits(model, tokenizer, task, items, records,
                                                     seq_len, eval_cfg, device, precision),
                             strict=True):
                r["maj"] = ok
            _drain(model, generation_autocast(device, precision))
    for r in records:
        del r["prompt"]  # only the numbers travel between ranks
    records = sorted(shard.gather(records), key=lambda r: r["index"])
    return _task_metrics(task, data, records, multiple_choice, generative, eval_cfg.samples)


def _drain(model, context=None) -> None:
    """Match the other ranks' forward calls (a `Lockstep` model), in the phase's precision."""
    if isinstance(model, Lockstep):
        with context or contextlib.nullcontext(), torch.no_grad():
            model.drain()


def _task_metrics(task: Task, data: TaskData, records: list[dict[str, Any]],
                  multiple_choice: bool, generative: bool, samples: int) -> dict[str, Any]:
    """The task's metrics from every item's record, in item order."""
    if [r["index"] for r in records] != list(range(len(data.items))):
        raise RuntimeError(f"task {task.name}: the ranks' records do not cover its "
                           f"{len(data.items)} items once each")
    picks = [item.label if multiple_choice else 0 for item in data.items]
    nats = -sum(r["logps"][p] for r, p in zip(records, picks, strict=True))
    n_tokens = sum(r["n_tokens"] for r in records)
    n_bytes = sum(r["n_bytes"] for r in records)
    accuracy, extra = None, {}
    if multiple_choice:
        accuracy = _choice_accuracy(data.items, [r["logps"] for r in records])
    elif generative:
        accuracy = sum(r["correct"] for r in records) / len(records)
        if samples:
            extra[f"maj@{samples}"] = sum(r["maj"] for r in records) / len(records)
    return {"kind": task.kind, "loss": nats / n_tokens,
            "bits_per_token": nats / n_tokens / math.log(2),
            "bits_per_byte": nats / n_bytes / math.log(2), "accuracy": accuracy,
            "n_items": len(data.items), **extra}


def _choice_accuracy(items: tuple[TaskItem, ...], logps: list[list[float]]) -> float:
    """acc_norm: the choice with the highest log-likelihood per character is the gold one."""
    hits = 0
    for item, lp in zip(items, logps, strict=True):
        scores = [x / max(1, len(c)) for x, c in zip(lp, item.choices, strict=True)]
        hits += max(range(len(scores)), key=scores.__getitem__) == item.label
    return hits / len(items)


def _budgets(task: Task, records: list[dict[str, Any]]) -> list[int]:
    if task.is_correct is None:
        raise BadConfig(f"task {task.name} has neither choices nor an answer checker")
    return [task.max_new_tokens or 2 * r["n_tokens"] + 8 for r in records]


def _generation_hits(model, tokenizer: Tokenizer, task: Task, items: list[TaskItem],
                     records: list[dict[str, Any]], seq_len: int, batch_size: int,
                     device, precision: str) -> list[bool]:
    """Whether each item's greedy answer is correct."""
    texts = greedy_generate(model, [r["prompt"] for r in records], _budgets(task, records),
                            tokenizer=tokenizer, stop=task.stop, seq_len=seq_len,
                            batch_size=batch_size, device=device, precision=precision)
    return [bool(task.is_correct(t, item)) for t, item in zip(texts, items, strict=True)]


def _majority_hits(model, tokenizer: Tokenizer, task: Task, items: list[TaskItem],
                   records: list[dict[str, Any]], seq_len: int, eval_cfg: EvalConfig,
                   device, precision: str) -> list[bool]:
    """maj@K per item: K sampled answers, the most frequent final answer judged.

    Sample j of item i is seeded by its key i * K + j, wherever the item is evaluated.
    """
    K = eval_cfg.samples
    budgets = [b for b in _budgets(task, records) for _ in range(K)]
    prompts = [r["prompt"] for r in records for _ in range(K)]
    keys = [r["index"] * K + j for r in records for j in range(K)]
    sampling = Sampling(temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
                        seed=eval_cfg.seed)
    texts = generate_texts(model, prompts, budgets, tokenizer=tokenizer, stop=task.stop,
                           seq_len=seq_len, batch_size=eval_cfg.batch_size, device=device,
                           sampling=sampling, keys=keys, precision=precision)
    return [bool(task.is_correct(majority_vote(texts[n * K: (n + 1) * K], task.vote_key), item))
            for n, item in enumerate(items)]


def majority_vote(texts: list[str], key) -> str:
    """The first text whose key is the most frequent (texts whose key is None do not vote)."""
    counts: dict[Any, int] = {}
    for t in texts:
        k = key(t)
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    if not counts:
        return texts[0]
    best = max(counts.values())
    return next(t for t in texts if (k := key(t)) is not None and counts[k] == best)


def load_tasks(cfg: RunConfig, tasks: list[str] | tuple[str, ...] | None = None
               ) -> dict[str, tuple[Task, TaskData]]:
    """Resolve and load every task up front, so a missing data file fails before any work."""
    names = list(cfg.eval.tasks if tasks is None else tasks)
    resolved = [get_task(name) for name in names]
    return {t.name: (t, t.load(cfg.data, max_items=cfg.eval.max_items)) for t in resolved}


def evaluate_tasks(model: torch.nn.Module, tokenizer: Tokenizer, cfg: RunConfig,
                   tasks: list[str] | None = None, *, device: torch.device | str = "cpu",
                   progress: bool = False, shard: EvalShard | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Metrics of each task (default: cfg.eval.tasks), keyed by task name.

    Runs under `torch.no_grad()` in eval mode and restores the model's mode after.
    With a `shard` (`moe.eval.shard`) every rank of the group calls this alike: each
    evaluates its share of the items (a sharded model in lockstep) and all return
    the same metrics.
    """
    shard = shard or EvalShard()
    loaded = load_tasks(cfg, tasks)
    was_training = model.training
    model.eval()
    runner = Lockstep(model, device, tokenizer.pad_id) if shard.lockstep and shard.world > 1 \
        else model
    results = {}
    try:
        with torch.no_grad():
            for name, (task, data) in loaded.items():
                results[name] = evaluate_task(runner, tokenizer, task, data, cfg.eval,
                                              cfg.model.seq_len, device, shard,
                                              cfg.train.precision)
                if progress and shard.rank == 0:
                    print(f"{name:<20} {summary_line(results[name])}", file=sys.stderr)
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------- results


def flat_results(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`task/<name>/<metric>` keys for result.json (columns of `moe sweep collect`)."""
    return {f"task/{name}/{key}": metrics.get(key) for name, metrics in results.items()
            for key in (*METRICS, *sorted(k for k in metrics if k.startswith("maj@")))}


def write_eval(run_dir: str | Path, results: dict[str, dict[str, Any]],
               out: str | Path | None = None, *, step: int | None = None) -> Path:
    """Store results: merged into RUN_DIR/eval.json (and result.json if it exists), or,
    with `out`, written to that file alone (the run directory is left as it is)."""
    if out is not None:
        record = {"tasks": results, **({} if step is None else {"step": step})}
        return atomic_write_json(out, record)
    return RunDir(run_dir).merge_eval(results, flat_results(results), step=step)


def summary_line(m: dict[str, Any]) -> str:
    acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
    acc += "".join(f"  {k} {v:.3f}" for k, v in m.items() if k.startswith("maj@"))
    return (f"{m['kind']:<12} loss {m['loss']:.4f} nats/token  {m['bits_per_byte']:.4f} "
            f"bits/byte  accuracy {acc}  ({m['n_items']} items)")

"""The paper's real tasks, read from local files in their public (HuggingFace) schemas.

Each task reads `$MOE_TASK_DATA/<task>/<split>.jsonl` (or `.parquet`), with
`MOE_TASK_DATA` defaulting to `~/.cache/moe-tasks`. Where no such file exists and
the `datasets` library is installed, it is asked (its cache, or the network);
otherwise loading fails with one line naming the file to download.

| task      | kind         | eval split | shots from       | shots | HuggingFace dataset     |
|-----------|--------------|------------|------------------|-------|-------------------------|
| gsm8k     | reasoning    | test       | train            | 4     | openai/gsm8k, main      |
| gsm-plus  | reasoning    | test       | train, else test | 4     | qintongli/GSM-Plus      |
| math500   | reasoning    | test       | train, else test | 4     | HuggingFaceH4/MATH-500  |
| triviaqa  | memorization | validation | train            | 4     | mandarjoshi/trivia_qa,  |
|           |              |            |                  |       | rc.nocontext            |
| hellaswag | memorization | validation | train            | 0     | Rowan/hellaswag         |

Only GSM8K's 4 shots come from the paper; the others are this toolkit's choice.
Where a task has no train split, shots come from its other items, never from
the same item or (GSM-Plus) from a variation of the same seed question.

Prompts follow lm-evaluation-harness: `Question: ...\\nAnswer:` with the gold
answer after a space. GSM8K's answer is the whole gold solution ending `#### N`
(verbatim, calculator annotations included); GSM-Plus's is its `solution`
followed by `#### answer`, and its critical-thinking items (answer "None") are
skipped. HellaSwag is scored as lm-eval's acc_norm.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe.config import DataConfig
from moe.tasks.answers import (
    extract_boxed,
    extract_number,
    matches_any,
    math_equal,
    number_key,
    numbers_equal,
    parse_number,
)
from moe.tasks.base import Task, TaskData, TaskDataError, TaskItem

DEFAULT_DATA_DIR = "~/.cache/moe-tasks"


def task_data_dir() -> Path:
    """Where real-task files live: $MOE_TASK_DATA, default ~/.cache/moe-tasks."""
    return Path(os.environ.get("MOE_TASK_DATA") or DEFAULT_DATA_DIR).expanduser()


@dataclass(frozen=True, kw_only=True)
class Source:
    """Where a real task's rows come from."""

    task: str
    hf_path: str
    hf_config: str | None
    eval_split: str
    shot_split: str | None
    convert: Callable[[dict[str, Any]], TaskItem | None]
    """A row in the public schema -> item (None skips the row); KeyError on a bad row."""


def read_rows(src: Source, split: str) -> list[dict[str, Any]] | None:
    """Rows of one split from a local file, else from `datasets`; None when neither has it."""
    base = task_data_dir() / src.task
    for ext in ("jsonl", "parquet"):
        path = base / f"{split}.{ext}"
        if path.is_file():
            return _read_file(str(path), path.stat().st_mtime_ns)
    return _from_datasets(src, split)


@functools.lru_cache(maxsize=8)
def _read_file(path: str, mtime_ns: int) -> list[dict[str, Any]]:
    """JSONL or parquet rows (cached per file version: periodic evals reread nothing)."""
    if path.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):  # noqa: B007 - n names the bad line
                if line.strip():
                    rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise TaskDataError(f"{path}:{n} is not valid JSON") from None
        except UnicodeDecodeError:
            raise TaskDataError(f"{path} is not UTF-8 text") from None
    return rows


def _from_datasets(src: Source, split: str) -> list[dict[str, Any]] | None:
    try:
        import datasets
    except ImportError:
        return None
    try:
        ds = datasets.load_dataset(src.hf_path, src.hf_config, split=split)
    except Exception:  # no cache and no network: the caller names the file to download
        return None
    return [dict(row) for row in ds]


def _items(src: Source, rows: list[dict[str, Any]], split: str) -> tuple[TaskItem, ...]:
    items = []
    for n, row in enumerate(rows, 1):
        try:
            item = src.convert(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise TaskDataError(f"{src.task} {split} row {n} does not have the "
                                f"{src.hf_path} schema ({type(exc).__name__}: {exc})") from None
        if item is not None:
            items.append(item)
    return tuple(items)


def load_source(src: Source, data_cfg: DataConfig | None = None) -> TaskData:
    """The task's eval items and shot pool; a one-line TaskDataError when the data is absent."""
    rows = read_rows(src, src.eval_split)
    if rows is None:
        config = f" (config {src.hf_config})" if src.hf_config else ""
        raise TaskDataError(
            f"task {src.task} has no data: save the {src.eval_split} split of "
            f"https://huggingface.co/datasets/{src.hf_path}{config} as "
            f"{task_data_dir() / src.task / (src.eval_split + '.jsonl')} "
            f"(or point MOE_TASK_DATA at a directory holding {src.task}/{src.eval_split}.jsonl)")
    items = _items(src, rows, src.eval_split)
    shot_rows = read_rows(src, src.shot_split) if src.shot_split else None
    pool = items if shot_rows is None else _items(src, shot_rows, src.shot_split)
    return TaskData(items=items, shot_pool=pool)


# --------------------------------------------------------------------------- schemas


def gsm8k_item(row: dict[str, Any]) -> TaskItem:
    """{question, answer}: the answer is the worked solution ending `#### N`."""
    answer = str(row["answer"]).strip()
    target = extract_number(answer) if "####" in answer else None
    if target is None:
        raise ValueError("answer does not end in '#### N'")
    return TaskItem(prompt=f"Question: {row['question']}\nAnswer:", answer=" " + answer,
                    targets=(target,))


def gsm_plus_item(row: dict[str, Any]) -> TaskItem | None:
    """{question, solution, answer, perturbation_type, seed_question, ...}."""
    final = str(row["answer"]).strip()
    if parse_number(final) is None:  # critical thinking: the question lacks what it needs
        return None
    solution = str(row["solution"]).strip()
    if "####" not in solution:
        solution = f"{solution}\n#### {final}"
    return TaskItem(prompt=f"Question: {row['question']}\nAnswer:", answer=" " + solution,
                    targets=(final,), group=str(row.get("seed_question") or ""))


def triviaqa_item(row: dict[str, Any]) -> TaskItem:
    """rc.nocontext: {question, answer: {value, aliases, normalized_aliases, ...}}."""
    ans = row["answer"]
    aliases = (str(ans["value"]), *map(str, ans["aliases"]), *map(str, ans["normalized_aliases"]))
    return TaskItem(prompt=f"Question: {str(row['question']).strip()}\nAnswer:",
                    answer=" " + str(ans["value"]), targets=aliases)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_item(row: dict[str, Any]) -> TaskItem:
    """{ctx (or ctx_a, ctx_b), endings, label, activity_label} as lm-eval's hellaswag."""
    if str(row["label"]).strip() == "":
        raise ValueError("no label (the test split is unlabelled; use validation)")
    ctx = (f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}" if row.get("ctx_a") is not None
           else str(row["ctx"]))
    choices = tuple(" " + _hellaswag_clean(str(e)) for e in row["endings"])
    label = int(row["label"])
    return TaskItem(prompt=_hellaswag_clean(f"{row['activity_label']}: {ctx}"),
                    answer=choices[label], targets=(choices[label],), choices=choices,
                    label=label)


def math500_item(row: dict[str, Any]) -> TaskItem:
    """{problem, solution, answer, subject, level, unique_id}."""
    return TaskItem(prompt=f"Problem:\n{row['problem']}\n\nSolution:",
                    answer=" " + str(row["solution"]).strip(), targets=(str(row["answer"]),))


def _final_number(text: str, item: TaskItem) -> bool:
    return numbers_equal(extract_number(text), item.targets[0])


def _alias_match(text: str, item: TaskItem) -> bool:
    return matches_any(text, item.targets)


def _boxed_match(text: str, item: TaskItem) -> bool:
    return math_equal(extract_boxed(text), item.targets[0])


def _real(name: str, kind: str, description: str, n_shots: int, src: Source, **kw) -> Task:
    return Task(name=name, kind=kind, description=description, n_shots=n_shots,
                loader=functools.partial(load_source, src), **kw)


_GSM_STOP = ("\n\n", "Question:")
REAL_TASKS = (
    _real("gsm8k", "reasoning", "grade-school math word problems, worked solutions", 4,
          Source(task="gsm8k", hf_path="openai/gsm8k", hf_config="main", eval_split="test",
                 shot_split="train", convert=gsm8k_item),
          is_correct=_final_number, stop=_GSM_STOP, max_new_tokens=256,
          vote_key=number_key),
    _real("gsm-plus", "reasoning", "GSM8K test questions under perturbations", 4,
          Source(task="gsm-plus", hf_path="qintongli/GSM-Plus", hf_config=None,
                 eval_split="test", shot_split="train", convert=gsm_plus_item),
          is_correct=_final_number, stop=_GSM_STOP, max_new_tokens=256,
          vote_key=number_key),
    _real("math500", "reasoning", "MATH competition problems (500-problem subset)", 4,
          Source(task="math500", hf_path="HuggingFaceH4/MATH-500", hf_config=None,
                 eval_split="test", shot_split="train", convert=math500_item),
          is_correct=_boxed_match, stop=("\n\nProblem:",), max_new_tokens=512,
          vote_key=extract_boxed),
    _real("triviaqa", "memorization", "closed-book trivia questions, any alias matches", 4,
          Source(task="triviaqa", hf_path="mandarjoshi/trivia_qa", hf_config="rc.nocontext",
                 eval_split="validation", shot_split="train", convert=triviaqa_item),
          is_correct=_alias_match, stop=("\n",), max_new_tokens=32),
    _real("hellaswag", "memorization", "commonsense sentence endings (acc_norm)", 0,
          Source(task="hellaswag", hf_path="Rowan/hellaswag", hf_config=None,
                 eval_split="validation", shot_split="train", convert=hellaswag_item)),
)

"""The pocket tasks: held-out items of the synthetic pocket corpus (`moe.data.pocket`).

- `pocket-memorization`: questions about facts the corpus states ("Q: What is
  the pet of Lirodra?\\nA:" -> " ferret"), like TriviaQA in the paper. 0-shot by
  default: the Q/A form is one of the corpus's own templates.
- `pocket-reasoning`: fresh multi-step arithmetic problems, never in the corpus,
  with the worked solution ending `#### N` as the answer, like GSM8K. 0-shot by
  default: the problem format is the corpus's, and the pocket context (128 bytes
  by default) holds about one problem; few-shot examples, when asked for, come
  from the corpus's problems.

Both are functions of the run's `DataConfig`, so every run sees the same items.
"""

from __future__ import annotations

from moe.config import DataConfig
from moe.data.pocket import PocketItem, build_pocket
from moe.tasks.answers import extract_number, number_key, numbers_equal
from moe.tasks.base import Task, TaskData, TaskItem


def _item(p: PocketItem) -> TaskItem:
    return TaskItem(prompt=p.prompt, answer=p.answer, targets=(p.target,))


def _memorization(data_cfg: DataConfig) -> TaskData:
    corpus = build_pocket(data_cfg)
    return TaskData(items=tuple(map(_item, corpus.memorization_eval)),
                    shot_pool=tuple(map(_item, corpus.memorization_train)))


def _reasoning(data_cfg: DataConfig) -> TaskData:
    corpus = build_pocket(data_cfg)
    return TaskData(items=tuple(map(_item, corpus.reasoning_eval)),
                    shot_pool=tuple(map(_item, corpus.reasoning_train)))


def exact_match(text: str, item: TaskItem) -> bool:
    return text.strip() in item.targets


def final_number_matches(text: str, item: TaskItem) -> bool:
    return numbers_equal(extract_number(text), item.targets[0])


POCKET_TASKS = (
    Task(name="pocket-memorization", kind="memorization", n_shots=0, loader=_memorization,
         is_correct=exact_match, stop=("\n",),
         description="recall of pocket knowledge-base facts, asked as questions"),
    Task(name="pocket-reasoning", kind="reasoning", n_shots=0, loader=_reasoning,
         is_correct=final_number_matches, stop=("\n",), vote_key=number_key,
         description="held-out multi-step arithmetic with fresh numbers (#### N)"),
)

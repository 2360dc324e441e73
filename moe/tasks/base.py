"""What a task is: items to score, a pool of few-shot examples, and how to judge an answer.

A task item is scored two ways (see `moe.evaluate`):

- **task loss**: the negative log-likelihood of `answer` given the few-shot prompt
  and `prompt` (the paper's metric);
- **accuracy**: greedy generation judged by the task's `is_correct`, or, for a
  multiple-choice task (`choices` set), whether the gold choice has the highest
  length-normalised log-likelihood.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from moe.config import DataConfig
from moe.errors import BadConfig, BadInput
from moe.tasks.answers import text_key

KINDS = ("memorization", "reasoning")
EVAL_SEED = 1234
"""Seed for item subsets and shot draws: fixed, so every run of a sweep sees the same prompts."""


class TaskDataError(BadInput):
    """A task's data is missing or malformed; the message says which file and what to do."""


@dataclass(frozen=True, kw_only=True)
class TaskItem:
    """One scored item (or one few-shot example)."""

    prompt: str
    """The question, formatted; the model continues it."""
    answer: str
    """The gold continuation whose tokens are scored for the task loss."""
    targets: tuple[str, ...]
    """Answers accepted by `Task.is_correct` (a final number, a fact's value, aliases)."""
    choices: tuple[str, ...] = ()
    """Multiple-choice continuations (HellaSwag); empty for generation tasks."""
    label: int = -1
    """Index of the gold continuation in `choices`."""
    group: str = ""
    """Items of one group never serve as each other's shots ('' = the prompt itself)."""

    def __post_init__(self) -> None:
        if not self.answer:
            raise TaskDataError(f"task item {self.prompt[:60]!r} has an empty answer")
        if self.choices and not 0 <= self.label < len(self.choices):
            raise TaskDataError(f"task item {self.prompt[:60]!r}: label {self.label} is not an "
                                f"index into its {len(self.choices)} choices")

    @property
    def shot_text(self) -> str:
        """The item as a solved example."""
        return self.prompt + self.answer

    @property
    def group_key(self) -> str:
        return self.group or self.prompt


@dataclass(frozen=True, kw_only=True)
class TaskData:
    items: tuple[TaskItem, ...]
    """Evaluation items."""
    shot_pool: tuple[TaskItem, ...]
    """Few-shot examples: the task's train split (or its other items where it has none)."""


@dataclass(frozen=True, kw_only=True)
class Task:
    """A registered evaluation task."""

    name: str
    kind: str
    """memorization | reasoning: what the analysis groups task losses by."""
    description: str
    n_shots: int
    """Default few-shot examples per prompt."""
    loader: Callable[[DataConfig], TaskData]
    """Reads (or generates) the items; raises TaskDataError with a one-line fix."""
    is_correct: Callable[[str, TaskItem], bool] | None = None
    """Judges a generated continuation (cut at the stop strings); None for multiple choice."""
    stop: tuple[str, ...] = ("\n",)
    """Generation stops at EOS or at the first of these strings."""
    max_new_tokens: int = 0
    """Generation budget; 0 = twice the gold answer's tokens plus 8."""
    shot_separator: str = "\n\n"
    vote_key: Callable[[str], object] = text_key
    """Self-consistency (maj@K): sampled answers with equal keys are the same answer;
    None means the sample gives no answer (default: the normalised text)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadConfig(f"task {self.name}: kind={self.kind!r} must be one of {KINDS}")
        if self.n_shots < 0 or self.max_new_tokens < 0:
            raise BadConfig(f"task {self.name}: n_shots and max_new_tokens must be >= 0")

    def load(self, data_cfg: DataConfig, *, max_items: int = 0,
             seed: int = EVAL_SEED) -> TaskData:
        """The task's items; with max_items > 0 a seeded subset of them, in their order."""
        data = self.loader(data_cfg)
        if not data.items:
            raise TaskDataError(f"task {self.name} has no items")
        if 0 < max_items < len(data.items):
            keep = sorted(random.Random(f"{seed}:{self.name}").sample(range(len(data.items)),
                                                                       max_items))
            data = TaskData(items=tuple(data.items[i] for i in keep), shot_pool=data.shot_pool)
        return data

    def shots_for(self, item: TaskItem, index: int, pool: tuple[TaskItem, ...], n_shots: int,
                  seed: int = EVAL_SEED) -> list[TaskItem]:
        """`n_shots` examples for item `index`, drawn deterministically, never of its group."""
        if n_shots == 0:
            return []
        rng = random.Random(f"{seed}:{self.name}:{index}")
        # A small over-draw avoids scanning a large pool (TriviaQA's train split is 138k).
        drawn = [pool[i] for i in rng.sample(range(len(pool)), min(len(pool), n_shots + 16))]
        shots = [s for s in drawn if s.group_key != item.group_key][:n_shots]
        if len(shots) < n_shots:
            candidates = [s for s in pool if s.group_key != item.group_key]
            if len(candidates) < n_shots:
                raise TaskDataError(f"task {self.name} needs {n_shots} few-shot examples but "
                                    f"has {len(candidates)}; lower eval.n_shots")
            shots = rng.sample(candidates, n_shots)
        return shots

    def context(self, item: TaskItem, shots: list[TaskItem]) -> str:
        """Few-shot examples, then the item's prompt."""
        return "".join(s.shot_text + self.shot_separator for s in shots) + item.prompt

"""Task registry: pocket synthetic tasks and the paper's real tasks.

Every task declares its `kind`, memorization or reasoning, which the analysis
groups task losses by. `list_tasks()` names them; `get_task(name)` returns one.
"""

from __future__ import annotations

from moe.errors import BadInput
from moe.tasks.base import EVAL_SEED, KINDS, Task, TaskData, TaskDataError, TaskItem
from moe.tasks.pocket import POCKET_TASKS
from moe.tasks.real import REAL_TASKS, task_data_dir

_REGISTRY: dict[str, Task] = {t.name: t for t in (*POCKET_TASKS, *REAL_TASKS)}


def list_tasks() -> list[str]:
    """Registered task names, pocket tasks first."""
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name raises with the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadInput(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}") from None


__all__ = ["EVAL_SEED", "KINDS", "Task", "TaskData", "TaskDataError", "TaskItem", "get_task",
           "list_tasks", "task_data_dir"]

"""Task evaluation of a model: task losses (the paper's metric) and accuracies."""

from moe.eval.evaluate import (
    METRICS,
    POCKET_DEFAULT,
    evaluate_task,
    evaluate_tasks,
    flat_results,
    load_tasks,
    summary_line,
    write_eval,
)
from moe.eval.shard import EvalShard, Lockstep

__all__ = ["METRICS", "POCKET_DEFAULT", "EvalShard", "Lockstep", "evaluate_task",
           "evaluate_tasks", "flat_results", "load_tasks", "summary_line", "write_eval"]

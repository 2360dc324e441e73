"""Collectives of a multi-process run take tensors on the run's device (NCCL's rule), checked
on gloo ranks with a guard that rejects tensors made on the host (`tests.guards`)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tests.distributed import run_ranks
from tests.guards import HostTensorInCollective, collectives_on_run_device
from tests.helpers import tiny_config


def _guarded_run(run_dir: str, overrides: list[str]) -> None:
    """train_run under a preemption watch (so every step polls) with the collective guard."""
    from moe.train import train_run
    from moe.train.preempt import PreemptionWatch

    with PreemptionWatch(signal.SIGUSR2), collectives_on_run_device("cpu"):
        train_run(tiny_config(*overrides), run_dir)


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_steps_poll_validation_and_task_evaluation_reduce_run_device_tensors(tmp_path, layout):
    run_dir = tmp_path / "run"
    run_ranks(2, _guarded_run, str(run_dir), [
        "train.tokens=2048", "train.checkpoint_every=4", f"parallel.data={layout}",
        "train.grad_accum=2", 'eval.tasks=["pocket-memorization"]', "eval.max_items=4",
        "eval.every=4"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and "task/pocket-memorization/loss" in result


def test_the_guard_rejects_a_host_tensor_and_accepts_a_moved_one():
    import torch.distributed as dist

    from moe.train.preempt import PreemptionWatch

    def reduce(made_on_host: bool):
        flag = torch.tensor([1.0]) if made_on_host else torch.tensor([1.0], device="cpu")
        doubled = (flag * 2).float()  # derived tensors keep where they came from
        dist.all_reduce(doubled)

    with collectives_on_run_device("cpu"):
        with pytest.raises(HostTensorInCollective):
            reduce(made_on_host=True)
        with pytest.raises(HostTensorInCollective):
            dist.broadcast(torch.from_numpy(__import__("numpy").ones(2)), 0)
        with pytest.raises(ValueError, match="Default process group"):
            reduce(made_on_host=False)  # passes the guard, reaches torch.distributed
        with pytest.raises(ValueError, match="Default process group"):
            dist.all_reduce(torch.ones(2).to("cpu"))
        watch = PreemptionWatch()
        assert watch.poll(1, "cpu") is False  # one process: no collective at all

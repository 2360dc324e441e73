"""Task evaluation split over gloo ranks (moe.eval.shard) against one process evaluating all.

The references are one process with batch size 1 (so neither the batching nor the split
is shared with the code under test); the model is random, and the generative task judges
an answer by a hash of its text, so any change in a generated token changes accuracy.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe.config import EvalConfig
from moe.data.shards import load_data
from moe.eval import EvalShard, evaluate_task, evaluate_tasks
from moe.model import MoELM
from moe.tasks import Task, TaskData, TaskItem, get_task
from tests.distributed import run_ranks, train_in
from tests.helpers import tiny_config

MODEL = ["model.seq_len=128", "model.n_experts=4", "model.top_k=2"]
N_ITEMS = 7  # odd: the two ranks hold 4 and 3 items


def _hash_judged(text: str, item: TaskItem) -> bool:
    return zlib.crc32(text.encode()) % 2 == 0


def _first_char(text: str):
    return text.strip()[:1] or None


def _rotate(choices: tuple[str, ...], gold_at: int) -> tuple[str, ...]:
    rest = list(choices[1:])
    return tuple(rest[:gold_at] + [choices[0]] + rest[gold_at:])


def _tasks(cfg) -> list[tuple[Task, TaskData]]:
    """A scored task, a generated one (greedy and maj@3) and a multiple-choice one."""
    memo = get_task("pocket-memorization")
    memo_data = memo.load(cfg.data, max_items=N_ITEMS)
    gen = Task(name="hash", kind="reasoning", description="", n_shots=1,
               loader=lambda _: memo_data, is_correct=_hash_judged, max_new_tokens=6,
               vote_key=_first_char)
    mc_items = tuple(replace(i, choices=_rotate((i.answer, " no", " 17"), n % 3), label=n % 3)
                     for n, i in enumerate(memo_data.items))
    mc = Task(name="choice", kind="memorization", description="", n_shots=0,
              loader=lambda _: TaskData(items=mc_items, shot_pool=mc_items))
    return [(memo, memo_data), (gen, memo_data), (mc, TaskData(items=mc_items,
                                                               shot_pool=mc_items))]


def _evaluate(model, cfg, eval_cfg, shard=None, runner=None) -> dict:
    tok = load_data(cfg.data, cfg.model.seq_len).tokenizer
    model.eval()
    out = {}
    with torch.no_grad():
        for task, data in _tasks(cfg):
            out[task.name] = evaluate_task(runner or model, tok, task, data, eval_cfg,
                                           cfg.model.seq_len, "cpu", shard)
    return out


def _sharded(out_path: str, layout: str) -> None:
    import torch.distributed as dist

    from moe.eval import Lockstep
    from moe.train.distributed import Dist
    from moe.train.parallel import parallelize

    cfg = tiny_config(*MODEL, *{"replica": [], "fsdp": ["parallel.data=fsdp"],
                                "ep": ["parallel.data=fsdp", "parallel.expert=2"]}[layout])
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    runner = None
    shard = EvalShard.current()
    if layout != "replica":
        model, _ = parallelize(model, cfg, torch.device("cpu"), Dist.current(), bf16=False)
        runner = Lockstep(model, "cpu", pad_id=load_data(cfg.data, 128).tokenizer.pad_id)
        shard = EvalShard.current(lockstep=True)
    eval_cfg = EvalConfig(batch_size=2, accuracy=True, samples=3, temperature=1.0, seed=5)
    out = _evaluate(model, cfg, eval_cfg, shard, runner)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(out))


@pytest.fixture(scope="module")
def one_process() -> dict:
    cfg = tiny_config(*MODEL)
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    eval_cfg = EvalConfig(batch_size=1, accuracy=True, samples=3, temperature=1.0, seed=5)
    return _evaluate(model, cfg, eval_cfg)


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, metrics in want.items():
        assert got[name].keys() == metrics.keys(), name
        for key, value in metrics.items():
            if isinstance(value, float) and key not in ("accuracy", "maj@3"):
                assert got[name][key] == pytest.approx(value, rel=1e-5), (name, key)
            else:  # accuracies are counts of items: equal, not close
                assert got[name][key] == value, (name, key)


def test_the_reference_is_not_degenerate(one_process):
    """The hash-judged answers split (so generation differences would show) and every
    kind of metric is there."""
    assert 0 < one_process["hash"]["accuracy"] < 1
    assert one_process["hash"]["maj@3"] is not None
    assert one_process["choice"]["accuracy"] is not None
    assert one_process["pocket-memorization"]["n_items"] == N_ITEMS


@pytest.mark.parametrize("layout", ["replica", "fsdp", "ep"])
def test_items_split_over_two_ranks_give_the_one_process_metrics(layout, one_process,
                                                                 tmp_path):
    out = tmp_path / "metrics.json"
    run_ranks(2, _sharded, str(out), layout)
    _assert_same(json.loads(out.read_text()), one_process)


def test_a_shard_takes_every_world_th_item_and_all_shards_cover_each_once():
    shards = [EvalShard(r, 3).items(10) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError, match="rank 3 is not in a group of 3"):
        EvalShard(3, 3)


# ------------------------------------------------------------------ in training


STEPS = ["model.seq_len=64", "train.tokens=5120", "train.checkpoint_every=10", "eval.max_items=5",
         'eval.tasks=["pocket-memorization"]', "eval.accuracy=false", "parallel.data=fsdp"]


def test_fsdp_training_evaluates_tasks_sharded_and_adds_a_task_later(tmp_path):
    """Two FSDP ranks evaluate the task at the end of training and, relaunched with a
    second task, evaluate only that one on the shards loaded from the checkpoint; both
    equal one process evaluating the finished weights."""
    from moe.checkpoint import load_run_model

    run_dir = tmp_path / "run"
    run_ranks(2, train_in, str(run_dir), STEPS)
    more = [*STEPS[:-3], 'eval.tasks=["pocket-memorization","pocket-reasoning"]',
            "eval.accuracy=false", "parallel.data=fsdp"]
    cfg = tiny_config(*more)
    checkpoints_before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    run_ranks(2, train_in, str(run_dir), more)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints_before
    result = json.loads((run_dir / "result.json").read_text())
    model, _, step = load_run_model(run_dir)
    assert step == 10
    data = load_data(cfg.data, cfg.model.seq_len)
    want = evaluate_tasks(model, data.tokenizer, cfg)
    for name in ("pocket-memorization", "pocket-reasoning"):
        assert result[f"task/{name}/loss"] == pytest.approx(want[name]["loss"], rel=1e-5)

    import shutil

    from moe.rundir import RunDir
    from moe.train import train_run

    other = tmp_path / "other"  # another run's sharded checkpoint is refused, not resumed
    (_, path), = RunDir(run_dir).list_sharded_checkpoints()
    shutil.copytree(path, other / "checkpoints" / path.name)
    with pytest.raises(ValueError, match="was written by run"):
        train_run(tiny_config(*STEPS, "train.seed=1"), other)


@pytest.mark.slow
def test_moe_eval_under_torchrun_splits_the_items_and_equals_one_process(tmp_path):
    import subprocess
    import sys

    from moe.train import train_run

    run_dir = tmp_path / "run"
    train_run(tiny_config("model.seq_len=64", "train.tokens=5120"), run_dir)
    args = [str(run_dir), "--tasks", "pocket-memorization,pocket-reasoning", "--max-items", "5"]
    one = subprocess.run([sys.executable, "-m", "moe", "eval", *args, "--out",
                          str(tmp_path / "one.json")], capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "moe", "eval", *args, "--out",
                          str(tmp_path / "two.json")], capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1  # process 0 alone writes
    got, want = (json.loads((tmp_path / f"{n}.json").read_text())["tasks"]
                 for n in ("two", "one"))
    _assert_same(got, want)
    assert want["pocket-reasoning"]["n_items"] == 5

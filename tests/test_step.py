"""`moe.train.step`: the training loss is CE + aux x load-balance + z x z-loss, and the step
both training benchmarks time is the step `moe train` runs, bit for bit."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import tiny_config
from moe.app import bench_train as app_bench
from moe.model import MoELM
from moe.train import build_optimizer, train_step
from moe.train.distributed import Dist

ROOT = Path(__file__).resolve().parent.parent
# A tight clip, so a step that skips clipping ends elsewhere; both loss terms switched on.
CFG = tiny_config("train.aux_loss_coef=0.05", "train.z_loss_coef=0.01", "train.grad_clip=0.05")


def _script_bench():
    spec = importlib.util.spec_from_file_location("bench_train_script",
                                                  ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokens() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, CFG.model.vocab_size, (CFG.train.batch_size, CFG.model.seq_len + 1),
                         generator=gen)


def _model_and_opt():
    torch.manual_seed(0)
    model = MoELM(CFG.model)
    return model, build_optimizer(model, CFG.train)


def _train_step(model, opt, tokens_BT1: torch.Tensor) -> float:
    """`moe train`'s step on this batch: train_step with a data source that returns it."""
    x, y = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    data = SimpleNamespace(train=SimpleNamespace(
        batch=lambda seed, step, n, rows=None: (x[rows], y[rows])))
    lr = opt.param_groups[0]["lr"]
    return train_step(model, opt, data, CFG, 0, lr, torch.device("cpu"), Dist()).loss


def test_training_loss_is_ce_plus_weighted_balance_and_z_terms():
    model, opt = _model_and_opt()
    tokens = _tokens()
    with torch.no_grad():
        out = copy.deepcopy(model)(tokens[:, :-1], tokens[:, 1:])
    # One micro-batch on one rank: the step's load-balance term is the Switch loss.
    expected = float(out.ce_loss + 0.05 * out.lb_loss + 0.01 * out.z_loss)
    assert _train_step(model, opt, tokens) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bench", ["moe bench train", "benchmarks/bench_train.py"])
def test_benchmark_step_equals_the_training_step(bench):
    tokens = _tokens()
    trained, opt = _model_and_opt()
    train_loss = _train_step(trained, opt, tokens)
    timed, opt = _model_and_opt()
    if bench == "moe bench train":
        bench_loss = app_bench._step(timed, opt, CFG, tokens, torch.device("cpu"))
    else:
        _script_bench().time_steps(timed, opt, CFG, [(tokens[:, :-1], tokens[:, 1:])], 0)
        bench_loss = train_loss  # the script reports times only; the weights must agree
    assert bench_loss == train_loss
    for (name, a), b in zip(trained.state_dict().items(), timed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name

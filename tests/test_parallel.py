"""Scale-out on CPU: [parallel] config, the step-global load-balance loss, per-rank batches,
FSDP2, expert parallelism and sharded checkpoints on gloo ranks, each against one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError, apply_overrides, config_hash
from moe.model import MoELM
from moe.rundir import RunDir
from moe.train import train_run
from moe.train.balance import routing_counts, step_balance_term
from moe.train.parallel import check_layout
from tests.distributed import run_ranks, train_in
from tests.helpers import tiny_config

STEPS = ["train.tokens=5120", "train.log_every=1", "train.checkpoint_every=10"]  # 20 steps


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r]


def _result(run_dir) -> dict:
    return json.loads((RunDir(run_dir).path / "result.json").read_text())


def _assert_same_run(run_dir, reference, tol=1e-5) -> None:
    got, want = _losses(run_dir), _losses(reference)
    assert len(got) == len(want) == 20
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < tol, (got, want)
    assert _result(run_dir)["val_loss"] == pytest.approx(_result(reference)["val_loss"], abs=tol)


def _cut_back_to_step_10(src, dst) -> None:
    """A copy of a finished run as it was when it was killed just after step 10."""
    shutil.copytree(src, dst)
    (dst / "result.json").unlink()
    for path in (dst / "checkpoints").glob("step-00000020*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run every layout must reproduce (20 steps, checkpoints at 10, 20)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_run(tiny_config(*STEPS), run_dir)
    return run_dir


# ------------------------------------------------------------------ config and loss, 1 process


def test_parallel_section_round_trips_and_is_not_in_the_run_id():
    cfg = tiny_config()
    other = apply_overrides(cfg, ["parallel.data=fsdp", "parallel.expert=2",
                                  "parallel.activation_checkpointing=true"])
    assert other.parallel.data == "fsdp" and other.parallel.expert == 2
    assert config_hash(other) == config_hash(cfg)
    assert "[parallel]" in other.to_toml()
    with pytest.raises(ConfigError, match="parallel.data"):
        apply_overrides(cfg, ["parallel.data=zero3"])
    with pytest.raises(ConfigError, match="parallel.expert"):
        apply_overrides(cfg, ["parallel.expert=0"])
    with pytest.raises(ValueError, match="needs parallel.data"):
        check_layout(apply_overrides(cfg, ["parallel.expert=2"]), 2)
    check_layout(other, 1)  # one process runs any layout's checkpoint
    with pytest.raises(ValueError, match="must divide the 3 processes"):
        check_layout(other, 3)
    with pytest.raises(ValueError, match="n_experts=4 must be divisible"):
        check_layout(apply_overrides(other, ["parallel.expert=8"]), 8)


def test_step_balance_loss_over_micro_batches_is_the_switch_loss_of_the_whole_batch():
    torch.manual_seed(0)
    cfg = tiny_config("model.n_experts=8", "model.top_k=3")
    model = MoELM(cfg.model)
    x_BT = torch.randint(0, 200, (6, 32))
    with torch.no_grad():
        whole = model(x_BT, x_BT)  # the router's own loss over all 6 rows: the reference
        parts = [model(x_BT[rows], x_BT[rows]) for rows in (slice(0, 2), slice(2, 6))]
    # unequal micro-batches: weight each by its rows; n_parts = 1 sums them
    counts = sum(routing_counts(p) for p in parts)
    lb = sum(step_balance_term(p, counts, top_k=3, n_parts=1) for p in parts)
    assert float(lb) == pytest.approx(float(whole.lb_loss), rel=1e-6)
    assert float(step_balance_term(whole, routing_counts(whole), 3, 1)) == pytest.approx(
        float(whole.lb_loss), rel=1e-6)


def test_micro_batch_rows_of_any_split_cover_the_same_global_batch():
    from moe.data.shards import load_data
    from moe.train.distributed import Dist
    from moe.train.step import micro_rows

    cfg = tiny_config()
    data = load_data(cfg.data, cfg.model.seq_len)
    whole, _ = data.train.batch(0, 5, 8)
    for accum, world in ((1, 1), (2, 1), (1, 2), (2, 2), (4, 2)):
        split = apply_overrides(cfg, [f"train.grad_accum={accum}"])
        rows = [data.train.batch(0, 5, 8, micro_rows(split, Dist(rank=r, world=world), m))[0]
                for m in range(accum) for r in range(world)]
        assert torch.equal(torch.cat(rows), whole), (accum, world)


def test_activation_checkpointing_recomputes_the_same_gradients(reference, tmp_path):
    run_dir = tmp_path / "ac"
    train_run(tiny_config(*STEPS, "parallel.activation_checkpointing=true"), run_dir)
    _assert_same_run(run_dir, reference, tol=1e-6)


# ------------------------------------------------------------------ gloo ranks vs 1 process


def test_fsdp_on_two_ranks_equals_one_process_then_resumes_on_one(reference, tmp_path):
    run_dir = tmp_path / "fsdp"  # the ranks evaluate a task, each on its share of the items
    run_ranks(2, train_in, str(run_dir), [*STEPS, "parallel.data=fsdp",
                                          'eval.tasks=["pocket-memorization"]',
                                          "eval.max_items=4", "eval.accuracy=false"])
    _assert_same_run(run_dir, reference)  # losses step by step, and sharded validation
    assert "task/pocket-memorization/loss" in _result(run_dir)
    assert [s for s, _ in RunDir(run_dir).list_sharded_checkpoints()] == [20, 10]
    resumed = tmp_path / "resumed-on-one"
    _cut_back_to_step_10(run_dir, resumed)
    train_run(tiny_config(*STEPS, "parallel.data=fsdp"), resumed)  # 1 process reads DCP
    _assert_same_run(resumed, reference)


def test_expert_parallel_on_two_ranks_equals_one_process_and_resumes_from_one(reference,
                                                                              tmp_path):
    run_dir = tmp_path / "ep"
    run_ranks(2, train_in, str(run_dir), [*STEPS, "parallel.data=fsdp", "parallel.expert=2"])
    _assert_same_run(run_dir, reference)
    on_one = tmp_path / "on-one"  # experts saved by 2 ranks (DCP), resumed on 1 process
    _cut_back_to_step_10(run_dir, on_one)
    train_run(tiny_config(*STEPS, "parallel.data=fsdp", "parallel.expert=2"), on_one)
    _assert_same_run(on_one, reference)
    resumed = tmp_path / "from-one"  # saved by 1 process (.pt), resumed on 2 expert ranks
    _cut_back_to_step_10(reference, resumed)
    run_ranks(2, train_in, str(resumed), [*STEPS, "parallel.data=fsdp", "parallel.expert=2"])
    _assert_same_run(resumed, reference)


def test_one_process_accum_two_equals_two_ranks_accum_one(tmp_path):
    one = tmp_path / "accum2"
    train_run(tiny_config(*STEPS, "train.grad_accum=2"), one)
    two = tmp_path / "ranks2"
    run_ranks(2, train_in, str(two), STEPS)  # DDP
    _assert_same_run(two, one)


@pytest.mark.slow
def test_fsdp_two_by_expert_two_on_four_ranks_equals_one_process(reference, tmp_path):
    run_dir = tmp_path / "mesh"  # with accumulation: the step's routing counted first
    run_ranks(4, train_in, str(run_dir), [*STEPS, "parallel.data=fsdp", "parallel.expert=2",
                                          "parallel.activation_checkpointing=true",
                                          "train.grad_accum=2"])
    _assert_same_run(run_dir, reference)


def _validate(out_path: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    from moe.data.shards import load_data
    from moe.train import validation_loss
    from moe.train.distributed import Dist

    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    data = load_data(cfg.data, cfg.model.seq_len)
    loss = validation_loss(model, data, cfg, torch.device("cpu"), Dist.current())
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out_path).write_text(repr(loss))


def test_sharded_validation_equals_single_process_validation(tmp_path):
    run_ranks(2, _validate, str(tmp_path / "two"), ["train.grad_accum=2"])  # 2 chunks a rank
    _validate(str(tmp_path / "one"), [])  # one process, whole batches
    two, one = (float((tmp_path / n).read_text()) for n in ("two", "one"))
    assert two == pytest.approx(one, abs=1e-6)


@pytest.mark.slow
def test_torchrun_trains_one_run_on_two_processes_and_eval_reads_its_shards(tmp_path):
    import subprocess
    import sys

    from moe.checkpoint import load_run_model
    from tests.helpers import TINY

    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config().to_toml())
    out = tmp_path / "run"
    sets = [a for kv in [*TINY, *STEPS, "parallel.data=fsdp"] for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "moe", "train", str(config), "--out", str(out), "--quiet", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _result(out)["world_size"] == 2
    assert [s for s, _ in RunDir(out).list_sharded_checkpoints()] == [20, 10]
    model, cfg, step = load_run_model(out)  # `moe eval` on a run trained sharded
    assert step == 20 and cfg.parallel.data == "fsdp"
    from moe.data.shards import load_data
    from moe.train import validation_loss

    data = load_data(cfg.data, cfg.model.seq_len)
    assert validation_loss(model, data, cfg, torch.device("cpu")) == pytest.approx(
        _result(out)["val_loss"], abs=1e-5)


def test_stop_warning_checkpoints_at_the_next_step_boundary_before_the_requeue(tmp_path):
    import os
    import signal
    import threading
    import time

    from moe.train.preempt import PreemptionWatch

    cfg = tiny_config("train.tokens=16384", "train.checkpoint_every=1000", "train.log_every=1")
    run_dir = tmp_path / "run"
    seen: dict = {}

    class Requeued(Exception):
        pass

    def submitit_handler(signum, frame):  # what submitit does: RunJob.checkpoint(), requeue
        seen["checkpoints"] = [s for s, _ in RunDir(run_dir).list_checkpoints()]
        seen["logged"] = [r["step"] for r in RunDir(run_dir).read_metrics()]
        raise Requeued

    def warn_after_three_steps():
        deadline = time.monotonic() + 60
        while len(RunDir(run_dir).read_metrics()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        threading.Thread(target=warn_after_three_steps, daemon=True).start()
        with PreemptionWatch(signal.SIGUSR2), pytest.raises(Requeued):
            train_run(cfg, run_dir)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    (step,) = seen["checkpoints"]  # written at the boundary, before the handler ran
    assert 3 <= step < 64 and seen["logged"][-1] == step
    resumed = train_run(cfg, run_dir)
    uninterrupted = train_run(cfg, tmp_path / "reference")
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert resumed["val_loss"] == uninterrupted["val_loss"]


def test_collectives_wait_the_configured_timeout_not_nccls_ten_minutes(monkeypatch):
    """Rank 0 alone checkpoints and evaluates the EMA while the others wait at a barrier."""
    from datetime import timedelta

    import torch.distributed as dist

    from moe.train import distributed

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_config("parallel.timeout_min=90")
    assert distributed.init_from_env(cfg.parallel.timeout_min)
    assert seen["timeout"] == timedelta(minutes=90) > timedelta(minutes=10)
    assert tiny_config().parallel.timeout_min == 60
    with pytest.raises(ConfigError, match="parallel.timeout_min"):
        tiny_config("parallel.timeout_min=0")


def _expert_parallel_layer(out_path: str) -> None:
    """On each of 2 ranks: the expert-parallel layer vs the whole layer, bf16 autocast."""
    import torch.distributed as dist

    from moe.model.experts import SwiGLUExperts
    from moe.train import expert_parallel
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same weights on both ranks, different tokens
    whole = SwiGLUExperts(16, 32, 4, backend="torch")
    whole.reset_parameters(0.3, 0.3)
    ep = expert_parallel.make_expert_parallel(
        SwiGLUExperts(16, 32, 4, backend="torch").requires_grad_(False), dist.group.WORLD)
    with torch.no_grad():
        for name, p in ep.named_parameters():
            p.copy_(getattr(whole, name)[expert_parallel.expert_block(4, 2, rank)])
    torch.manual_seed(1 + rank)
    x_TD = torch.randn(37, 16)
    idx_TK = torch.rand(37, 4).argsort(-1)[:, :3]  # k = 3, every expert on both ranks
    weight_TK = torch.rand(37, 3).softmax(-1)
    sent, real = [], expert_parallel._all_to_all
    expert_parallel._all_to_all = lambda x, *a: sent.append(x.dtype) or real(x, *a)
    reads = []
    real_tolist = torch.Tensor.tolist
    torch.Tensor.tolist = lambda t: reads.append(t.shape) or real_tolist(t)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ep(x_TD, idx_TK, weight_TK)
            want = whole(x_TD, idx_TK, weight_TK)
    finally:
        expert_parallel._all_to_all, torch.Tensor.tolist = real, real_tolist
    assert sent == [torch.bfloat16, torch.bfloat16], sent  # rows there and back, half bytes
    assert len(reads) == 1, reads  # one host read per layer: both exchanges' split sizes
    assert got.dtype == torch.float32 and torch.equal(got, want), (got - want).abs().max()
    Path(out_path + f".{rank}").write_text("ok")


def test_expert_parallel_layer_sends_bf16_rows_and_combines_like_one_process(tmp_path):
    run_ranks(2, _expert_parallel_layer, str(tmp_path / "done"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.0", "done.1"]


MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "torch_grouped_mm", "_grouped_mm",
           "grouped_mm", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_attention_math"}


def _dtypes_of_one_step(cfg, model) -> dict:
    """Under the run's autocast: block inputs and outputs, router weight and routing weights,
    expert operands, every matmul's operands, the losses; and weights as FSDP gathers them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moe.model import experts as experts_mod
    from moe.train.step import autocast_for

    inner = getattr(model, "module", model)
    seen: dict[str, list] = {"parity": [], "gathered": []}

    def note(kind, *what):
        seen[kind].append([*what])

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in MATMULS:
                note("parity", name, sorted({str(a.dtype) for a in args
                                             if isinstance(a, torch.Tensor)
                                             and a.is_floating_point()}))
            return func(*args, **(kwargs or {}))

    for block in inner.blocks:
        block.register_forward_pre_hook(lambda m, a: note("parity", "block in", str(a[0].dtype)))
        block.register_forward_hook(lambda m, a, o: note("parity", "block out", str(o[0].dtype)))
        block.ffn.router.register_forward_pre_hook(
            lambda m, a: note("parity", "router weight", str(m.weight_ED.dtype)))
        block.ffn.router.register_forward_hook(
            lambda m, a, o: note("parity", "routing weights", str(o.weight_TK.dtype)))
        block.attn.wo.register_forward_pre_hook(
            lambda m, a: note("gathered", "attention", str(m.weight.dtype)))
    real = experts_mod._LOADED["torch"]

    def experts(x, plan, w13, w2):
        note("parity", "experts", str(x.dtype), str(w13.dtype), str(w2.dtype))
        y = real(x, plan, w13, w2)
        note("parity", "expert rows", str(y.dtype))
        return y

    experts_mod._LOADED["torch"] = experts
    idx = torch.randint(0, 200, (2, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    try:
        with autocast_for(cfg.train, torch.device("cpu")), Matmuls():
            out = model(idx, idx)
    finally:
        experts_mod._LOADED["torch"] = real
    note("parity", "losses", str(out.ce_loss.dtype), str(out.lb_loss.dtype),
         str(out.z_loss.dtype), str(out.prob_sums[0].dtype))
    (out.ce_loss + out.lb_loss).backward()
    return seen


def _layout_dtypes(out_path: str) -> None:
    import torch.distributed as dist

    from moe.train.distributed import Dist
    from moe.train.parallel import parallelize

    found = {}
    layouts = {"one process": [], "ddp": ["parallel.data=ddp"], "fsdp": ["parallel.data=fsdp"],
               "fsdp x ep": ["parallel.data=fsdp", "parallel.expert=2"]}
    for name, overrides in layouts.items():
        cfg = tiny_config("train.precision=bf16", "model.experts_backend=torch", *overrides)
        torch.manual_seed(0)
        model = MoELM(cfg.model)
        if name != "one process":
            model, _ = parallelize(model, cfg, torch.device("cpu"), Dist.current(), bf16=True)
        found[name] = _dtypes_of_one_step(cfg, model)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(found))


def test_one_precision_policy_on_every_layout(tmp_path):
    """bf16 autocast on CPU: the same tensors have the same dtype on one process, DDP, FSDP2
    and FSDP2 x EP (docs/architecture.md, "Precision"); FSDP gathers matmul weights in bf16."""
    run_ranks(2, _layout_dtypes, str(tmp_path / "dtypes.json"))
    found = json.loads((tmp_path / "dtypes.json").read_text())
    one = found["one process"]["parity"]
    assert ["block in", "torch.float32"] in one and ["block out", "torch.float32"] in one
    assert ["router weight", "torch.float32"] in one
    assert ["routing weights", "torch.float32"] in one
    assert ["experts", "torch.bfloat16", "torch.bfloat16", "torch.bfloat16"] in one
    assert ["expert rows", "torch.bfloat16"] in one
    assert one[-1] == ["losses"] + ["torch.float32"] * 4
    fp32_matmuls = [m for m in one if m[0] in MATMULS and m[1] != ["torch.bfloat16"]]
    assert fp32_matmuls == [["mm", ["torch.float32"]]] * 2  # the two routers, nothing else
    for layout in ("ddp", "fsdp", "fsdp x ep"):
        assert found[layout]["parity"] == one, layout
    assert {d for _, d in found["fsdp"]["gathered"]} == {"torch.bfloat16"}  # half the bytes
    assert {d for _, d in found["ddp"]["gathered"]} == {"torch.float32"}  # autocast casts


@pytest.mark.slow
def test_compiled_blocks_train_the_same_run_with_the_same_parameter_names(tmp_path,
                                                                          monkeypatch):
    import copy

    from torch._dynamo.utils import counters

    from moe.checkpoint import load_run_model
    from moe.train import parallel

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert parallel.compiles(tiny_config(), cuda) and not parallel.compiles(tiny_config(), cpu)
    assert parallel.compiles(tiny_config("train.compile=true"), cpu)
    monkeypatch.setattr(parallel, "COMPILE_BACKEND", "aot_eager")  # inductor: minutes on CPU
    torch._dynamo.reset()
    counters.clear()
    short = ["train.tokens=2048", "train.log_every=1", "train.ema_decay=0.5"]
    compiled = train_run(tiny_config(*short, "train.compile=true"), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 2  # training and validation forwards
    eager = train_run(tiny_config(*short), tmp_path / "eager")
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), abs=1e-5)
    assert compiled["val_loss_ema"] == pytest.approx(eager["val_loss_ema"], abs=1e-5)
    model, cfg, _ = load_run_model(tmp_path / "compiled")  # the same names: loads strictly
    parallel.compile_blocks(model)
    twin = copy.deepcopy(model)  # a copy runs its own weights (the EMA is such a copy)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    idx = torch.randint(0, 100, (2, cfg.model.seq_len))
    fresh = MoELM(cfg.model)
    fresh.load_state_dict(twin.state_dict())
    torch.testing.assert_close(twin(idx).logits_BTV, fresh(idx).logits_BTV)
    assert not torch.allclose(model(idx).logits_BTV, twin(idx).logits_BTV)

"""Memory-aware planning: layouts, the memory formula, the paper grid on 80 GiB GPUs, requeues."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from moe.config import config_hash, load_config
from moe.params import count_params
from moe.sweeps.memory import GIB, HEADROOM, Layout, estimate_memory, plan_layout
from moe.sweeps.plan import format_plan, plan, requeue_limit, with_estimate
from moe.sweeps.profile import load_profile, profile_from_dict
from moe.sweeps.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parent.parent
H100 = ROOT / "slurm" / "profiles" / "h100x8.toml"


def _layout(**kw) -> Layout:
    base = dict(nodes=1, gpus=8, data="ddp", fsdp=1, expert=1, micro_batch=4, grad_accum=16,
                activation_checkpointing=False)
    return Layout(**{**base, **kw})


def test_paper_grid_plans_every_run_within_80_gib_per_gpu():
    spec, profile = load_spec(ROOT / "sweeps" / "paper.toml"), load_profile(H100)
    runs = plan(spec, with_estimate(spec, profile.mfu, profile.gpu_peak_tflops), profile)
    assert len(runs) == 69
    for r in runs:
        lay, cfg = r.layout, r.config
        assert r.mem_per_gpu_gib <= HEADROOM * 80
        assert lay["gpus"] * lay["micro_batch"] * lay["grad_accum"] == cfg.train.batch_size
        assert lay["gpus"] == lay["nodes"] * 8 and lay["nodes"] <= 8
        assert cfg.model.n_experts % lay["expert"] == 0
        assert r.run_id == config_hash(r.config)  # the layout is outside the run id
    by_size = max(runs, key=lambda r: r.n_params_total)
    assert by_size.n_params_total > 100e9 and by_size.layout["gpus"] >= 20
    assert by_size.config.parallel.data == "fsdp"
    assert by_size.config.parallel.micro_batch == by_size.layout["micro_batch"]
    rows = json.loads(format_plan(runs, "json"))
    assert {"layout", "mem_per_gpu_gib"} <= set(rows[0])
    assert "mem_gib" in format_plan(runs, "table")


def test_a_run_that_fits_nowhere_is_an_error_naming_it():
    spec = load_spec(ROOT / "sweeps" / "paper.toml")
    small = replace(load_profile(H100), gpu_mem_gib=8.0, max_nodes=1)
    with pytest.raises(SpecError, match=r"run \w{10} \(d\d+-E\d+-k\d+\) does not fit 8 GiB"):
        plan(spec, None, small)


def test_memory_formula_terms():
    cfg = load_config(ROOT / "configs" / "paper" / "d512-E8-k2.toml")
    n = count_params(cfg.model).total
    ddp = estimate_memory(cfg, _layout())
    assert ddp.states == 20 * n and ddp.transient == 0
    fsdp8 = estimate_memory(cfg, _layout(data="fsdp", fsdp=8))
    fsdp16 = estimate_memory(cfg, _layout(data="fsdp", fsdp=16, gpus=16, nodes=2))
    assert fsdp8.states == pytest.approx(16 * n / 8) and fsdp16.states == pytest.approx(
        fsdp8.states / 2)
    double = estimate_memory(cfg, _layout(micro_batch=8))
    assert double.activations == pytest.approx(2 * ddp.activations)
    ac = estimate_memory(cfg, _layout(activation_checkpointing=True))
    m = cfg.model  # AC keeps each block's input and recomputes one block at a time
    per_layer = 42 * m.d_model + 8 * m.n_experts + m.top_k * (6 * m.d_model + 10 * m.d_hidden)
    saved = (m.n_layers - 1) * per_layer - m.n_layers * 2 * m.d_model
    assert ddp.activations - ac.activations == pytest.approx(4 * m.seq_len * saved)
    # logits dominate a small model's activations: V x (2 + 8) bytes per token
    tokens = 4 * cfg.model.seq_len
    assert ddp.activations > tokens * cfg.model.vocab_size * 10
    assert ddp.total_gib == pytest.approx((ddp.states + ddp.activations) / GIB)


def test_plan_prefers_the_profile_nodes_and_grows_only_when_needed():
    cfg = load_config(ROOT / "configs" / "paper" / "d2048-E128-k16.toml")
    layout, mem = plan_layout(cfg, gpus_per_node=8, gpu_mem_gib=80, min_nodes=1, max_nodes=8)
    assert layout.nodes == 2 and mem.total_gib <= 72  # 52B: one node of 80 GB is too small
    small = load_config(ROOT / "configs" / "paper" / "d512-E8-k2.toml")
    layout, _ = plan_layout(small, gpus_per_node=8, gpu_mem_gib=80, min_nodes=1, max_nodes=8)
    assert (layout.nodes, layout.data, layout.expert) == (1, "ddp", 1)


def test_requeue_limit_covers_the_longest_run_and_profile_keys_are_checked():
    spec, profile = load_spec(ROOT / "sweeps" / "paper.toml"), load_profile(H100)
    runs = plan(spec, with_estimate(spec, profile.mfu, profile.gpu_peak_tflops), profile)
    longest_min = max(60 * r.gpu_hours / r.layout["gpus"] for r in runs)
    limit = requeue_limit(runs, profile)
    assert limit == 2 * math.ceil(longest_min / profile.timeout_min) + 10 and limit > 3
    with pytest.raises(SpecError, match="max_nodes=1 must be >= nodes=2"):
        profile_from_dict({"nodes": 2, "max_nodes": 1})
    with pytest.raises(SpecError, match="gpu_mem_gib"):
        profile_from_dict({"gpu_mem_gib": -1})
    assert profile_from_dict({"max_num_timeout": 50}).max_num_timeout == 50


def test_launch_submits_one_array_per_planned_node_count_with_the_requeue_limit(tmp_path,
                                                                                  monkeypatch):
    import contextlib

    import submitit

    from moe.rundir import RunDir
    from moe.sweeps.launch import launch

    calls: dict = {"ctor": {}, "arrays": []}

    class FakeExecutor:  # records what would go to sbatch
        def __init__(self, folder, cluster, **kwargs):
            calls["ctor"] = kwargs
            self.nodes = None

        def update_parameters(self, **params):
            self.nodes = params["nodes"]

        @contextlib.contextmanager
        def batch(self):
            calls["arrays"].append([self.nodes, 0])
            yield

        def submit(self, fn):
            calls["arrays"][-1][1] += 1
            return type("Job", (), {"job_id": f"{len(calls['arrays'])}_{calls['arrays'][-1][1]}"})

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    spec, profile = load_spec(ROOT / "sweeps" / "paper.toml"), load_profile(H100)
    report = launch(spec, tmp_path, executor="slurm", profile=profile)
    runs = plan(spec, with_estimate(spec, profile.mfu, profile.gpu_peak_tflops), profile)
    want = {}
    for r in runs:
        want[r.layout["nodes"]] = want.get(r.layout["nodes"], 0) + 1
    assert sorted(map(tuple, calls["arrays"])) == sorted(want.items())
    assert calls["ctor"]["slurm_max_num_timeout"] == requeue_limit(runs, profile)
    assert len(report.submitted) == 69
    big = max(runs, key=lambda r: r.n_params_total)
    written = RunDir(tmp_path / "runs" / big.run_id).read_config()
    assert written.parallel == big.config.parallel and written.parallel.data == "fsdp"

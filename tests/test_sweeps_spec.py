"""Sweep spec, plan and cluster-profile validation (CPU, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe.config import config_hash, load_config
from moe.sweeps.plan import format_plan, plan, with_estimate
from moe.sweeps.profile import PROFILE_KEYS, load_profile, profile_from_dict
from moe.sweeps.spec import SpecError, expand, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent
BASE = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 32},
        "train": {"batch_size": 4, "num_threads": 1}}


def make_spec(grid=None, **extra):
    raw = {"name": "t", "base": BASE,
           "grid": grid or {"model.n_experts": [1, 4, 8], "model.top_k": [1, 2]}, **extra}
    return spec_from_dict(raw)


def test_grid_expands_with_top_k_filter_and_default_tpp():
    runs = plan(make_spec())
    assert [(r.n_experts, r.top_k) for r in runs] == [(1, 1), (4, 1), (4, 2), (8, 1), (8, 2)]
    for r in runs:
        assert r.config.train.tpp == 20.0
        assert r.tokens == round(20 * r.n_params_total)
        assert r.run_id == config_hash(r.config)
        assert r.sparsity == pytest.approx(1 - r.top_k / r.n_experts)


def test_fixed_token_budget_and_sparsity_filter():
    spec = make_spec(budget={"tokens": 4096}, filters={"min_sparsity": 0.5})
    runs = plan(spec)
    assert {(r.n_experts, r.top_k) for r in runs} == {(4, 1), (4, 2), (8, 1), (8, 2)}
    assert all(r.tokens == 4096 and r.config.train.tokens == 4096 for r in runs)


def test_several_grids_are_a_union():
    spec = make_spec(grid=[{"model.n_experts": [1], "model.top_k": [1]},
                           {"model.n_experts": [8], "model.top_k": [2]}])
    assert [(r.n_experts, r.top_k) for r in plan(spec)] == [(1, 1), (8, 2)]


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"model.n_expert": [2]}}, "unknown config key 'model.n_expert'"),
    ({"grid": {"model.n_experts": []}}, "is empty"),
    ({"grid": {}}, "is empty"),
    ({"grids": {}}, "unknown sweep key"),
    ({"budget": {"tpp": 20, "tokens": 10}}, "keep one"),
    ({"budget": {"tokns": 10}}, "valid: tpp, tokens"),
    ({"filters": {"min_sparsity": 0.9, "max_sparsity": 0.5}}, "min_sparsity"),
    ({"estimate": {"mfu": 2}}, "estimate.mfu"),
    ({"base": 3}, "`base` must be"),
    ({"base": "missing.toml"}, "base config not found"),
])
def test_spec_errors_name_the_problem(raw, message):
    full = {"name": "t", "base": BASE, "grid": {"model.top_k": [1]}, **raw}
    with pytest.raises(SpecError, match=message):
        expand(spec_from_dict(full))


def test_invalid_combinations_are_all_listed():
    spec = make_spec(grid={"model.d_model": [30, 32, 34], "model.n_heads": [4]})
    with pytest.raises(SpecError) as err:
        expand(spec)
    msg = str(err.value)
    assert msg.startswith("2 invalid grid combination(s)")
    assert "d_model=30" in msg and "d_model=34" in msg and "d_model=32" not in msg


def test_a_huge_grid_is_refused_at_once_with_its_size(tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "huge.toml"  # 1000 x 1000 points: resolving them all takes half an hour
    spec.write_text('name = "huge"\n[base.model]\nd_model = 32\n[grid]\n'
                    f'"train.seed" = {list(range(1000))}\n"train.lr" = '
                    f'{[1e-3 + i * 1e-6 for i in range(1000)]}\n')
    proc = subprocess.run([sys.executable, "-m", "moe", "sweep", "plan", str(spec)],
                          capture_output=True, text=True, timeout=30)  # "a few seconds"
    assert proc.returncode == 2
    assert "1,000,000 points, more than the 2,000" in proc.stderr


def test_grid_size_limit_counts_points_before_filtering(monkeypatch):
    import moe.sweeps.spec as specmod

    monkeypatch.setattr(specmod, "MAX_GRID_POINTS", 6)
    assert len(expand(make_spec()).configs) == 5  # 3 x 2 = 6 points, one filtered
    with pytest.raises(SpecError, match="has 8 points"):
        expand(make_spec(grid=[{"model.n_experts": [1, 4, 8], "model.top_k": [1, 2]},
                               {"model.n_experts": [16], "model.top_k": [1, 2]}]))


def test_duplicate_runs_are_rejected():
    with pytest.raises(SpecError, match="duplicate run"):
        expand(make_spec(grid={"model.top_k": [1, 1]}))


def test_gpu_hour_caps():
    runs = plan(make_spec())
    biggest = max(r.gpu_hours for r in runs)
    capped = plan(make_spec(filters={"max_run_gpu_hours": biggest * 0.999}))
    assert len(capped) < len(runs)
    with pytest.raises(SpecError, match="max_total_gpu_hours"):
        plan(make_spec(filters={"max_total_gpu_hours": biggest / 2}))


def test_resolved_spec_round_trips(tmp_path):
    spec = make_spec(grid=[{"model.n_experts": [4], "model.top_k": [1, 2]},
                           {"model.n_experts": [1], "model.top_k": [1]}],
                     budget={"tokens": 2048})
    (tmp_path / "sweep.toml").write_text(spec.to_toml())
    again = load_spec(tmp_path / "sweep.toml")
    assert [r.run_id for r in plan(again)] == [r.run_id for r in plan(spec)]


def test_paper_grid_reproduces_design_counts():
    # (planning speed is measured by benchmarks/bench_sweeps.py, not asserted here)
    runs = plan(load_spec(ROOT / "sweeps" / "paper.toml"))
    by_key = {(r.d_model, r.n_experts, r.top_k): r for r in runs}
    assert len(runs) == 69  # 3 widths x (3 + 5 * 4) (E, k) pairs with k <= E
    small, big = by_key[(512, 8, 2)], by_key[(2048, 128, 16)]
    assert small.n_params_total == pytest.approx(320e6, rel=0.01)
    assert small.n_params_active == pytest.approx(170e6, rel=0.01)
    assert big.n_params_total == pytest.approx(52.2e9, rel=0.01)
    assert big.n_params_active == pytest.approx(7.1e9, rel=0.01)
    assert all(r.tokens == 125_000_000_000 and r.n_layers == 16 for r in runs)
    paper_config = load_config(ROOT / "configs" / "paper" / "d512-E8-k2.toml")
    assert small.config.model.vocab_size == paper_config.model.vocab_size
    assert small.config.model.seq_len == 2048


def test_pocket_grid_has_dense_baselines_and_sparsities():
    runs = plan(load_spec(ROOT / "sweeps" / "pocket.toml"))
    assert len(runs) >= 12
    assert any(r.n_experts == 1 for r in runs)
    assert len({round(r.sparsity, 3) for r in runs}) >= 3
    tasks = runs[0].config.eval.tasks
    assert set(tasks) == {"pocket-memorization", "pocket-reasoning"}


def test_pocket_science_design_and_the_demo_is_its_subset():
    science = plan(load_spec(ROOT / "sweeps" / "pocket-science.toml"))
    demo = plan(load_spec(ROOT / "sweeps" / "pocket.toml"))
    assert {r.run_id for r in demo} <= {r.run_id for r in science}
    for runs, min_tokens in ((science, 3), (demo, 2)):
        # sparsity at fixed active parameters: one (width, k=1, budget) spans E = 1 .. 32+
        by_group: dict = {}
        for r in runs:
            if r.top_k == 1:
                by_group.setdefault((r.d_model, r.tokens), set()).add(r.n_experts)
        assert all(max(es) >= 32 and min(es) == 1 for es in by_group.values())
        # top-k 1, 2, 4, 8 at matched total parameters
        totals: dict = {}
        for r in runs:
            totals.setdefault((r.d_model, r.tokens, r.n_params_total), set()).add(r.top_k)
        assert any(ks >= {1, 2, 4, 8} for ks in totals.values())
        assert len({r.tokens for r in runs}) >= min_tokens
        assert len({r.d_model for r in runs}) >= 2
    assert len({r.config.train.seed for r in science}) >= 2


def test_plan_formats():
    runs = plan(make_spec())
    rows = json.loads(format_plan(runs, "json"))
    assert len(rows) == len(runs) and {"run_id", "gpu_hours", "flops", "tpp"} <= set(rows[0])
    csv_text = format_plan(runs, "csv")
    assert csv_text.splitlines()[0].startswith("run_id,d_model,n_layers,n_experts,top_k")
    table = format_plan(runs, "table")
    assert "\x1b" not in table and f"{len(runs)} runs" in table
    with pytest.raises(SpecError, match="table, csv, json"):
        format_plan(runs, "yaml")


def test_a_cpu_estimate_counts_core_hours_and_the_wall_time_on_2_and_8_cores():
    runs = plan(make_spec(estimate={"device": "cpu", "mfu": 1.0, "gpu_peak_tflops": 1e-6}))
    core_hours = sum(r.flops for r in runs) / 1e6 / 3600  # 1 MFLOP/s per core
    table = format_plan(runs, "table", "cpu")
    assert "core_hours" in table.splitlines()[0] and "GPU-hours" not in table
    footer = table.splitlines()[-1]
    assert f"{core_hours:.4g} core-hours" in footer
    two, eight = core_hours / 2, core_hours / 8
    for hours in (two, eight):
        assert (f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h") in footer
    assert "GPU-hours" in format_plan(plan(make_spec()), "table")
    with pytest.raises(SpecError, match='estimate.device=.tpu. must be "gpu" or "cpu"'):
        make_spec(estimate={"device": "tpu"})


def test_profiles_load_and_override_the_estimate():
    for name in ("local", "h100x8"):
        load_profile(ROOT / "slurm" / "profiles" / f"{name}.toml")
    profile = profile_from_dict({"mfu": 0.5, "gpu_peak_tflops": 100.0, "account": ""})
    spec = make_spec()
    est = with_estimate(spec, profile.mfu, profile.gpu_peak_tflops)
    slow, fast = plan(spec)[0], plan(spec, est)[0]
    ratio = (spec.estimate.mfu * spec.estimate.gpu_peak_tflops) / (0.5 * 100.0)
    assert fast.gpu_hours == pytest.approx(slow.gpu_hours * ratio)
    assert "slurm_account" not in profile.executor_parameters("x")


def test_unknown_profile_key_lists_valid_ones():
    with pytest.raises(SpecError) as err:
        profile_from_dict({"gpus": 8})
    assert "gpus" in str(err.value) and all(k in str(err.value) for k in PROFILE_KEYS)


def test_written_run_config_reproduces_the_run_id(tmp_path):
    run = plan(make_spec())[1]
    (tmp_path / "config.toml").write_text(run.config.to_toml())
    assert config_hash(load_config(tmp_path / "config.toml")) == run.run_id

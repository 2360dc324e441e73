"""Sparsity analysis on a pocket-shaped synthetic table with known structure."""

import numpy as np
import pandas as pd
import pytest

from moe.analysis import sparsity, synthetic


@pytest.fixture(scope="module")
def long():
    return sparsity.long_table(synthetic.pocket_table(seed=0))


def test_long_table_has_tasks_and_kinds(long):
    kinds = long.groupby("task")["kind"].first().to_dict()
    assert kinds == {"arith": "reasoning", "recall": "memorization"}
    assert len(long) == 2 * 30


def test_reasoning_u_shape_optimum_near_truth(long):
    rows, skipped = sparsity.ushape_by_group(long, by="d_model", n_boot=200, seed=0)
    assert not skipped
    arith = [r["fit"] for r in rows if r["task"] == "arith"]
    assert len(arith) == 3
    for f in arith:  # generated with its minimum at s = 0.6 (plus pre-training-loss terms)
        assert f.interior and abs(f.optimum - 0.6) < 0.1
        assert f.interval[0] < f.optimum < f.interval[1]
        assert f.convex_fraction > 0.9


def test_ushape_needs_three_sparsities():
    with pytest.raises(ValueError, match="3 distinct"):
        sparsity.fit_ushape([0.0, 0.5, 0.5, 0.0], [1, 2, 3, 4])


def test_ushape_exact_quadratic():
    x = np.linspace(0, 1, 9)
    f = sparsity.fit_ushape(x, 2 + (x - 0.3) ** 2, n_boot=50)
    assert f.optimum == pytest.approx(0.3)
    assert f.coef[2] == pytest.approx(1.0)


def test_fixed_active_grouping(long):
    table = sparsity.loss_vs_sparsity(long, by="n_params_active")
    assert not table.empty and "n_params_active" in table
    assert table["n"].sum() == len(long)


def test_pretrain_slopes_match_generating_slope(long):
    slopes = sparsity.pretrain_slopes(long)
    mem = slopes[slopes["task"] == "recall"]
    assert np.allclose(mem["slope"], 1.3, atol=0.05)  # recall = 0.4 + 1.3 * pre-training loss


def test_topk_effect_at_equal_pretrain_loss(long):
    effect = sparsity.topk_effect(long)
    arith = effect[effect["task"] == "arith"].set_index("top_k")
    assert set(arith.index) == {2, 4}
    assert (arith["reference_k"] == 1).all()
    assert arith.loc[2, "effect"] < 0  # larger k reasons better at equal pre-training loss
    recall = effect[effect["task"] == "recall"]
    assert (recall["effect"].abs() < 0.01).all()  # memorization: no top-k effect generated


def test_no_task_columns_gives_empty_table():
    df = synthetic.pocket_table().loc[:, lambda d: [c for c in d if not c.startswith("task/")]]
    assert sparsity.long_table(df).empty


def test_ushape_in_log_tpp_per_task():
    df = synthetic.pocket_table(seed=1)
    tpp = np.exp(np.linspace(np.log(2), np.log(200), len(df)))
    df["tpp"] = tpp
    df["task/arith/loss"] = 3.0 + 0.2 * (np.log(tpp) - np.log(20.0)) ** 2  # minimum at TPP 20
    rows, skipped = sparsity.ushape_by_group(sparsity.long_table(df), by=None, x="log_tpp",
                                             n_boot=50)
    arith = next(r["fit"] for r in rows if r["task"] == "arith")
    assert np.exp(arith.optimum) == pytest.approx(20.0, rel=1e-6)
    assert arith.x_name == "log_tpp" and not skipped


def test_width_groups_split_fixed_token_budgets_only():
    base = dict(task="t", kind="reasoning", value=1.0)
    fixed_tokens = pd.DataFrame([{**base, "d_model": d, "tokens": t, "sparsity": s}
                                 for d in (32, 64) for t in (1e5, 4e5) for s in (0.0, 0.5)])
    grouped, by = sparsity.width_groups(fixed_tokens)
    assert by == "width_budget" and grouped[by].nunique() == 4
    fixed_tpp = fixed_tokens.assign(tokens=[1e5 * (i + 1) for i in range(len(fixed_tokens))])
    assert sparsity.width_groups(fixed_tpp)[1] == "d_model"

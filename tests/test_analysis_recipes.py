"""Recipe report sections recover known effects from synthetic tables, and say when a
quantity is not identified."""

import json

import numpy as np
import pandas as pd
import pytest

from moe.analysis import recipes
from moe.analysis.report import make_report


def _base(**cols):
    row = {"d_model": 32, "n_layers": 2, "n_experts": 4, "top_k": 1, "tokens": 1000,
           "train.seed": 0, "train.schedule": "cosine", "data.order": "shuffled",
           "val_loss": 3.0, "train_loss": 3.0}
    row.update(cols)
    return row


def test_merge_effects_pair_merged_with_last_and_baselines():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(4):
        rows.append(_base(**{"train.seed": seed, "train.schedule": "cosine", "val_loss": 2.9}))
        rows.append(_base(**{"train.seed": seed, "train.schedule": "constant", "val_loss": 3.0}))
        rows.append(_base(**{"train.seed": seed, "train.schedule": "constant",
                             "recipe": "merge", "merge.decay": "cosine", "merge.window": 40,
                             "last/val_loss": 3.0, "val_loss": 2.95 + 0.001 * rng.normal(),
                             "expert_load_mean": 1.2, "last/expert_load_mean": 1.3}))
    (m,) = recipes.merge_effects(pd.DataFrame(rows), n_boot=100)
    assert m["merged_minus_last"]["estimate"] == pytest.approx(-0.05, abs=0.003)
    assert m["merged_minus_last"]["identified"] and m["merged_minus_last"]["resolved"]
    assert m["merged_minus_last"]["interval"][1] < 0
    assert m["merged_minus_cosine"]["estimate"] == pytest.approx(0.05, abs=0.003)
    assert m["load_merged_minus_last"]["estimate"] == pytest.approx(-0.1)
    assert m["merged_minus_wsd"]["n"] == 0 and not m["merged_minus_wsd"]["identified"]


def test_curriculum_effect_per_schedule_with_ema():
    rows = []
    for seed in range(3):
        for schedule, gain in (("cosine", 0.0), ("constant", -0.1)):
            rows.append(_base(**{"train.seed": seed, "train.schedule": schedule,
                                 "val_loss": 3.0 + 0.01 * seed, "val_loss_ema": 2.9}))
            rows.append(_base(**{"train.seed": seed, "train.schedule": schedule,
                                 "data.order": "ascending-quality",
                                 "val_loss": 3.0 + gain + 0.01 * seed, "val_loss_ema": 2.8,
                                 "task/pocket-reasoning/loss": 1.5}))
            rows[-2]["task/pocket-reasoning/loss"] = 1.0
    table = pd.DataFrame(rows).assign(**{"train.min_lr_frac": 1 / 3})
    effects = {r["schedule"]: r for r in recipes.curriculum_effects(table)}
    effects["cosine"] = effects.pop("cosine to 0.333 x peak")
    assert effects["constant"]["val_loss/curriculum_minus_shuffled"]["estimate"] == \
        pytest.approx(-0.1)
    no_effect = effects["cosine"]["val_loss/curriculum_minus_shuffled"]
    assert no_effect["estimate"] == pytest.approx(0.0, abs=1e-12)
    assert no_effect["identified"] and not no_effect["resolved"]
    assert effects["cosine"]["val_loss_ema/curriculum_minus_shuffled"]["estimate"] == \
        pytest.approx(-0.1)
    task = effects["cosine"]["task/pocket-reasoning/loss/curriculum_minus_shuffled"]
    assert task["estimate"] == pytest.approx(0.5) and task["resolved"]


def test_regularised_scaling_recovers_the_fixed_data_law():
    sizes = np.geomspace(1e4, 1e6, 6)
    rows = []
    for wd, e in ((0.1, 1.6), (1.0, 1.3)):
        for n in sizes:
            rows.append(_base(**{"n_params_total": n, "train.weight_decay": wd,
                                 "data.unique_tokens": 5000, "val_loss": e + 30 * n ** -0.4}))
    fits = {f["label"]: f for f in recipes.regularised_scaling(pd.DataFrame(rows), n_boot=20)}
    tuned = fits["tuned weight decay (best per N)"]
    assert tuned["E"]["estimate"] == pytest.approx(1.3, rel=0.02)
    assert tuned["alpha"]["estimate"] == pytest.approx(0.4, rel=0.05)
    assert fits["weight_decay=0.1"]["E"]["estimate"] == pytest.approx(1.6, rel=0.02)
    assert all({"identified", "warnings", "interval"} <= set(tuned[k]) for k in ("E", "A", "alpha"))
    assert tuned["E"]["identified"]


def test_ensemble_scaling_is_exact_on_a_law_and_unidentified_on_two_sizes():
    rows = [_base(**{"recipe": "ensemble", "ensemble.k": k, "val_loss": 2.0 + 0.5 / k,
                     "val_loss_members_mean": 2.6, "val_loss_members_best": 2.5})
            for k in (1, 2, 3, 4)]
    (fit,) = recipes.ensemble_scaling(pd.DataFrame(rows), n_boot=50)
    assert fit["L_inf"]["estimate"] == pytest.approx(2.0) and fit["B"]["estimate"] == \
        pytest.approx(0.5)
    assert fit["L_inf"]["identified"] and fit["K"] == [1, 2, 3, 4]
    assert fit["minus_members_mean"]["estimate"] == pytest.approx(np.mean(
        [2.0 + 0.5 / k - 2.6 for k in (2, 3, 4)]))
    (two,) = recipes.ensemble_scaling(pd.DataFrame(rows[:2]), n_boot=50)
    assert not two["L_inf"]["identified"] and two["L_inf"]["warnings"]


def test_sections_only_for_recipe_tables_and_in_the_report(tmp_path):
    plain = pd.DataFrame([_base(), _base(**{"train.seed": 1})])
    assert not recipes.has_recipe_columns(plain) and recipes.recipe_sections(plain) == []
    # a sweep directory: recipe outputs come from SWEEP_DIR/recipes/*/result.json
    sweep = tmp_path / "sweep"
    rows = [_base(**{"recipe": "ensemble", "ensemble.k": k, "val_loss": 2.0 + 0.5 / k,
                     "run_id": f"ens{k}"}) for k in (1, 2, 3)]
    for r in rows:
        (sweep / "recipes" / r["run_id"]).mkdir(parents=True)
        (sweep / "recipes" / r["run_id"] / "result.json").write_text(json.dumps(r))
    table = recipes.with_recipe_outputs(plain, sweep)
    assert len(table) == 5 and recipes.has_recipe_columns(table)
    lines = recipes.recipe_sections(plain, sweep, n_boot=20)
    assert "### Ensemble scaling L(K) = L_inf + B/K" in lines
    out = make_report(table, tmp_path / "report.md", n_boot=20)
    assert "## Training recipes" in out.read_text()

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Paper-style figures from a results table
#
# The figures of Nakamura et al. (ICLR 2026), drawn from any results table that
# `moe sweep collect` wrote. By default this reads the table of `moe demo`
# (`moe-demo/results.parquet`); point `MOE_RESULTS` at another table or sweep
# directory to use yours.
#
# The question: does pre-training loss predict task performance equally for
# memorization and for reasoning, and how does sparsity (1 - k/E) move each?

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moe.analysis import plots, sparsity  # noqa: E402
from moe.analysis.tables import read_table  # noqa: E402

source = Path(os.environ.get("MOE_RESULTS", "moe-demo/results.parquet"))
df = read_table(source)
print(f"{len(df)} runs from {source}")
df[["run_id", "d_model", "n_experts", "top_k", "sparsity", "n_params_total", "tokens",
    "val_loss"]].sort_values(["d_model", "sparsity"]).head(20)

# %% [markdown]
# ## Pre-training loss against total parameters
# Colour is sparsity; dense models (E = 1) have sparsity 0.

# %%
fig = plots.fig_loss_vs_params(df)
plt.show()

# %% [markdown]
# ## Task loss against pre-training loss
# The paper's central figure: memorization tasks fall on one curve as
# pre-training loss drops; reasoning tasks fan out by sparsity.

# %%
try:
    fig = plots.fig_task_vs_pretrain(df)
    plt.show()
except plots.FigureSkipped as why:
    print("skipped:", why)

# %% [markdown]
# ## Task loss against sparsity, one line per width
# A U-shape for reasoning means an optimal sparsity below the maximum.

# %%
try:
    fig = plots.fig_task_vs_sparsity(df)
    plt.show()
except plots.FigureSkipped as why:
    print("skipped:", why)

# %% [markdown]
# ## The numbers behind the figures
# Per task: a quadratic U-shape fit in sparsity (with its optimum) and the slope of
# task loss on pre-training loss per sparsity.

# %%
long = sparsity.long_table(df, "loss")
fits, skipped = sparsity.ushape_by_group(long, by="d_model", n_boot=100)
for row in fits:
    print(row["task"], row["kind"], "d_model =", row["d_model"], row["fit"])
for why in skipped:
    print("skipped:", why)
sparsity.pretrain_slopes(long)

# %% [markdown]
# ## Top-k at equal pre-training loss
# Positive numbers: higher task loss than the smallest k at the same pre-training loss.

# %%
sparsity.topk_effect(long)

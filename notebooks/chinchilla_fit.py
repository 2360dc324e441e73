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
# # The Chinchilla fit on the reference data, with bootstrap intervals
#
# Hoffmann et al. (2022) Approach 3, as replicated by Besiroglu et al. (2024):
# fit $\log \hat L = \mathrm{LSE}(a - \alpha \log N,\ b - \beta \log D,\ e)$ with
# $A = e^a$, $B = e^b$, $E = e^e$, minimising the sum of Huber($\delta = 10^{-3}$)
# residuals of $\log L$, on Epoch AI's 240-point extraction of Chinchilla's Figure 4
# (the 5 highest losses dropped). The published optimum is $E = 1.8172$,
# $A = 477.8$, $B = 2143.9$, $\alpha = 0.3473$, $\beta = 0.3672$.
# `MOE_BOOTSTRAP` sets the number of resamples (1000 by default).

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from moe.analysis import fit as fitmod  # noqa: E402
from moe.analysis.bootstrap import bootstrap_fit  # noqa: E402

root = Path(os.environ.get("MOE_REPO", Path.cwd().parent if Path.cwd().name == "notebooks"
                           else Path.cwd()))
table = pd.read_csv(root / "tests" / "data" / "chinchilla_fig4_epoch_extraction.csv")
data = fitmod.prepare(table, n_col="Model Size", c_col="Training FLOP", loss_col="loss",
                      drop_highest=5)
result = fitmod.fit_data(data)
print(f"{result.n_points} points, objective {result.objective:.7f}, {result.seconds:.2f} s")
pd.Series(result.params)

# %% [markdown]
# ## Bootstrap: standard errors and 95% intervals

# %%
boot = bootstrap_fit(result, data, n_resamples=int(os.environ.get("MOE_BOOTSTRAP", "1000")),
                     seed=0)
pd.DataFrame({"se": boot.se, "low": {k: v[0] for k, v in boot.intervals.items()},
              "high": {k: v[1] for k, v in boot.intervals.items()}})

# %% [markdown]
# ## Compute-optimal allocation
# $N_{opt} = G (C/6)^{a}$, $D_{opt} = G^{-1} (C/6)^{b}$ with
# $a = \beta / (\alpha + \beta)$.

# %%
from moe.analysis import laws  # noqa: E402

p = result.params
for flops in (1e21, 1e23, 1e25):
    n_opt, d_opt = laws.compute_optimal_allocation(flops, p["A"], p["B"], p["alpha"], p["beta"])
    print(f"C = {flops:.0e}: N_opt = {n_opt:.3g}, D_opt = {d_opt:.3g}, "
          f"tokens/param = {d_opt / n_opt:.1f}")

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.hist(boot.samples["alpha"], bins=40, alpha=0.6, label="alpha")
ax.hist(boot.samples["beta"], bins=40, alpha=0.6, label="beta")
ax.set_xlabel("exponent")
ax.set_ylabel("bootstrap resamples")
ax.legend()
plt.show()

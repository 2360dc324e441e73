"""Recipes that read finished runs: checkpoint merging (`moe merge`) and logit-averaged
ensembles (`moe ensemble`). Each writes a run directory with a flat result.json."""

from moe.recipes.ensemble import LogitAverage, ensemble_runs
from moe.recipes.merge import DECAYS, merge_coefficients, merge_run, target_coefficients

__all__ = ["DECAYS", "LogitAverage", "ensemble_runs", "merge_coefficients", "merge_run",
           "target_coefficients"]

"""Sweeps: plan, launch (local, debug or SLURM through submitit), monitor and collect
grids of training runs.

    from moe.sweeps import load_spec, plan, launch, status, collect
    spec = load_spec("sweeps/pocket.toml")
    runs = plan(spec)                                  # list[RunPlan]
    launch(spec, "out/pocket", executor="local", max_parallel=2)
    status("out/pocket")                               # list[RunStatus]
    collect("out/pocket", "out/pocket/results.parquet").table

Only light modules load here; torch, submitit and pandas load when used.
"""

from moe.sweeps.collect import collect
from moe.sweeps.launch import LaunchError, LaunchReport, launch
from moe.sweeps.plan import RunPlan, plan
from moe.sweeps.profile import ClusterProfile, load_profile
from moe.sweeps.spec import SpecError, SweepSpec, load_spec
from moe.sweeps.status import RunStatus, status

__all__ = ["ClusterProfile", "LaunchError", "LaunchReport", "RunPlan", "RunStatus", "SpecError",
           "SweepSpec", "collect", "launch", "load_profile", "load_spec", "plan", "status"]

"""Sweeps: plan, launch (local, debug or SLURM through submitit), monitor and collect
grids of training runs.

    from sweeps import load_spec, plan, launch, status, collect
    spec = load_spec("sweeps/pocket.toml")
    runs = plan(spec)                                  # list[RunPlan]
    launch(spec, "out/pocket", executor="local", max_parallel=2)
    status("out/pocket")                               # list[RunStatus]
    collect("out/pocket", "out/pocket/results.parquet").table

Only light modules load here; torch, submitit and pandas load when used.
"""

from sweeps.collect import collect
from sweeps.launch import LaunchError, LaunchReport, launch
from sweeps.plan import RunPlan, plan
from sweeps.profile import ClusterProfile, load_profile
from sweeps.spec import SpecError, SweepSpec, load_spec
from sweeps.status import RunStatus, status

__all__ = ["ClusterProfile", "LaunchError", "LaunchReport", "RunPlan", "RunStatus", "SpecError",
           "SweepSpec", "collect", "launch", "load_profile", "load_spec", "plan", "status"]

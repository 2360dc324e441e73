"""`moe.sweeps.executor`: every executor is one module behind one interface, chosen by name,
its options checked before anything is planned or written."""

from __future__ import annotations

import pytest

from moe.sweeps.executor import EXECUTORS, Executor, LaunchError, make_executor
from moe.sweeps.profile import ClusterProfile


def test_each_name_gives_its_own_executor_module():
    made = {name: make_executor(name, sweep_name="s") for name in EXECUTORS}
    assert set(EXECUTORS) == {"local", "debug", "slurm"}
    for name, executor in made.items():
        assert isinstance(executor, Executor) and executor.name == name
        assert type(executor).__module__ == f"moe.sweeps.{name}"


@pytest.mark.parametrize("name, options, message", [
    ("pbs", {}, "unknown executor 'pbs'; valid: local, debug, slurm"),
    ("local", {"profile": ClusterProfile()}, "--cluster applies to the slurm executor only"),
    ("local", {"max_parallel": 0}, "--max-parallel 0 must be at least 1"),
    ("slurm", {"sweep_name": "a b"}, "sweep name 'a b' may hold only"),
])
def test_options_that_do_not_apply_are_refused(name, options, message):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(")):
        make_executor(name, **options)

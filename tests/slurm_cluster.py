"""The `slurm_cluster` fixture: tests that submit to the local SLURM cluster.

Import it into a test module (pytest finds fixtures in the module's namespace):

    from tests.slurm_cluster import slurm_cluster  # noqa: F401

    @pytest.mark.slurm
    def test_something(slurm_cluster, tmp_path): ...

The fixture skips the test unless MOE_TEST_SLURM=1 and `slurm/local-cluster status`
says the cluster is up (start it with `slurm/local-cluster up`). Otherwise it
sets os.environ["SLURM_CONF"] for the whole session, so submitit and every
SLURM command talk to that cluster, and yields a `SlurmCluster`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = REPO_ROOT / "slurm" / "local-cluster"
LOCAL_PROFILE = REPO_ROOT / "slurm" / "profiles" / "local.toml"
_EXPORT_PREFIX = "export SLURM_CONF="


@dataclass(frozen=True, kw_only=True)
class SlurmCluster:
    """The running local cluster, as the tests see it."""

    conf: Path
    """slurm.conf of the cluster (also in os.environ["SLURM_CONF"])."""
    profile: dict
    """slurm/profiles/local.toml, parsed."""

    @property
    def partition(self) -> str:
        return self.profile["partition"]

    def run(self, *args: str, timeout_s: float = 60) -> str:
        """Run a SLURM command (`sacct`, `scontrol`, ...) on this cluster; return stdout."""
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "SLURM_CONF": str(self.conf)})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc.stdout

    def squeue(self, *args: str) -> str:
        return self.run("squeue", *args)

    def sacct(self, *args: str) -> str:
        return self.run("sacct", *args)

    def job_states(self, job_id: str) -> list[str]:
        """Every state accounting recorded for the job, oldest first (requeues included)."""
        out = self.sacct("-n", "-X", "-P", "--duplicates", "-o", "State", "-j", str(job_id))
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def wait_for_state(self, job_id: str, states: set[str], timeout_s: float = 60) -> str:
        """Poll sacct until the job's latest state is one of `states`; return it."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.job_states(job_id)
            if current and current[-1] in states:
                return current[-1]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s}s "
                                   f"(states so far: {current})")
            time.sleep(1)


def cluster_conf() -> tuple[Path | None, str]:
    """(slurm.conf path, "") when the cluster is up, else (None, why not)."""
    try:
        proc = subprocess.run([str(LOCAL_CLUSTER), "status"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`slurm/local-cluster status` could not run: {exc}"
    for line in proc.stdout.splitlines():
        if proc.returncode == 0 and line.startswith(_EXPORT_PREFIX):
            return Path(line[len(_EXPORT_PREFIX):].strip()), ""
    said = " | ".join(proc.stdout.strip().splitlines()[-1:] + proc.stderr.strip().splitlines())
    return None, (f"the local SLURM cluster is not up ({said}); "
                  "start it with `slurm/local-cluster up`")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.environ.get("MOE_TEST_SLURM") != "1":
        pytest.skip("SLURM tests are off: set MOE_TEST_SLURM=1 (and `slurm/local-cluster up`)")
    conf, reason = cluster_conf()
    if conf is None:
        pytest.skip(reason)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(conf=conf, profile=tomllib.loads(LOCAL_PROFILE.read_text()))
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous

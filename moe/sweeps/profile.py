"""Cluster profiles: the SLURM resources of every job of a sweep, as a TOML file.

```toml
partition = "gpu"
account = "my-project"
nodes = 1
gpus_per_node = 8
tasks_per_node = 8        # one task per GPU: data parallel over nodes * tasks_per_node ranks
cpus_per_task = 12
mem_gb = 0                # 0 = all of the node's memory
timeout_min = 240         # a timed-out run is requeued and resumes from its checkpoint
setup = ["module load cuda/12.4", "source .venv/bin/activate"]
additional_parameters = { exclusive = true }
array_parallelism = 32
gpu_peak_tflops = 989.0   # used by `plan` for GPU-hours (overrides the spec's [estimate])
mfu = 0.4
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moe.sweeps.spec import SpecError, read_toml

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def check_no_control_chars(what: str, value: str) -> str:
    """SpecError when `value` holds a newline or another control character: in a batch
    script it would start a new line that the cluster runs."""
    if _CONTROL.search(value):
        raise SpecError(f"{what} {value!r} holds a newline or another control character; "
                        "remove it (it would become a command of its own in the job script)")
    return value


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    """Resources and scheduler options for every job of a sweep."""

    partition: str | None = None
    """SLURM partition (None or "" = the cluster's default; same for the next three)."""
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node (0 = a CPU job; no --gpus-per-node flag is passed)."""
    tasks_per_node: int = 1
    """Processes per node; nodes * tasks_per_node > 1 trains one run data-parallel."""
    cpus_per_task: int = 1
    mem_gb: float = 0
    """Memory per node in GB (0 = let SLURM decide)."""
    timeout_min: int = 60
    """Wall-clock limit of one job attempt; on timeout the run requeues and resumes."""
    constraint: str | None = None
    setup: tuple[str, ...] = ()
    """Shell lines run in the batch script before the job starts."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options, e.g. {exclusive = true}."""
    array_parallelism: int = 64
    """At most this many array tasks run at once."""
    gpu_peak_tflops: float | None = None
    """Peak TFLOP/s of one GPU, for GPU-hour estimates (None = the spec's)."""
    mfu: float | None = None
    """Assumed model FLOPs utilisation (None = the spec's)."""
    source: str = ""
    """Path the profile was read from."""
    gpu_mem_gib: float | None = None
    """Memory of one GPU in GiB; when set, `plan` picks every run's layout to fit it."""
    max_nodes: int | None = None
    """The most nodes one run may use (None = nodes); `nodes` stays the default for runs
    that fit on it."""
    max_num_timeout: int | None = None
    """Requeues after a timeout before submitit gives up (None = enough for the longest
    planned run: `requeue_limit`)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min",
                     "array_parallelism"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise SpecError(f"profile {name}={value!r} must be a positive integer")
        if not (isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 0):
            raise SpecError(f"profile gpus_per_node={self.gpus_per_node!r} must be an integer >= 0")
        if not (isinstance(self.mem_gb, (int, float)) and self.mem_gb >= 0):
            raise SpecError(f"profile mem_gb={self.mem_gb!r} must be a number >= 0")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise SpecError(f"profile mfu={self.mfu!r} must be in (0, 1]")
        if self.gpu_peak_tflops is not None and not self.gpu_peak_tflops > 0:
            raise SpecError(f"profile gpu_peak_tflops={self.gpu_peak_tflops!r} must be positive")
        if not all(isinstance(line, str) for line in self.setup):
            raise SpecError("profile setup must be a list of shell lines (strings)")
        if not isinstance(self.additional_parameters, dict):
            raise SpecError("profile additional_parameters must be a table")
        if self.gpu_mem_gib is not None and not (
                isinstance(self.gpu_mem_gib, (int, float)) and self.gpu_mem_gib > 0):
            raise SpecError(f"profile gpu_mem_gib={self.gpu_mem_gib!r} must be a positive number")
        for name in ("max_nodes", "max_num_timeout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise SpecError(f"profile {name}={value!r} must be a positive integer")
        if self.max_nodes is not None and self.max_nodes < self.nodes:
            raise SpecError(f"profile max_nodes={self.max_nodes} must be >= nodes={self.nodes}")
        self._check_strings()

    def _check_strings(self) -> None:
        """Every string that reaches the batch script is one line (no control characters),
        and sbatch option names are plain words."""
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SpecError(f"profile {name}={value!r} must be a string")
            check_no_control_chars(f"profile {name}", value or "")
        for line in self.setup:
            check_no_control_chars("profile setup line", line)
        for key, value in self.additional_parameters.items():
            if not _SBATCH_KEY.match(str(key)):
                raise SpecError(f"profile additional_parameters key {key!r} must be an sbatch "
                                "option name (letters, digits, '-', '_')")
            if not isinstance(value, (str, int, float, bool)):
                raise SpecError(f"profile additional_parameters.{key}={value!r} must be a "
                                "string, number or boolean")
            check_no_control_chars(f"profile additional_parameters.{key}", str(value))

    @property
    def world_size(self) -> int:
        """Processes that train one run together."""
        return self.nodes * self.tasks_per_node

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """Keyword arguments for `submitit.AutoExecutor.update_parameters`."""
        params: dict[str, Any] = {
            "name": job_name, "nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "timeout_min": self.timeout_min,
            "slurm_array_parallelism": self.array_parallelism,
            "slurm_setup": list(self.setup),
            "slurm_additional_parameters": dict(self.additional_parameters),
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):  # None or "" = the cluster's default
                params[f"slurm_{key}"] = getattr(self, key)
        return params


    @property
    def node_range(self) -> tuple[int, int]:
        """(fewest, most) nodes one run may use."""
        return self.nodes, self.max_nodes or self.nodes


PROFILE_KEYS = tuple(f.name for f in fields(ClusterProfile) if f.name != "source")


def load_profile(path: str | Path) -> ClusterProfile:
    """Read a cluster profile TOML; an unknown key is an error that lists the valid ones."""
    return profile_from_dict(read_toml(path, "cluster profile"), source=str(path))


def profile_from_dict(raw: dict[str, Any], *, source: str = "") -> ClusterProfile:
    unknown = sorted(set(raw) - set(PROFILE_KEYS))
    if unknown:
        where = f" in {source}" if source else ""
        raise SpecError(f"unknown cluster profile key(s) {unknown}{where}; valid: "
                        f"{', '.join(PROFILE_KEYS)}")
    values = dict(raw)
    if "setup" in values:
        if not isinstance(values["setup"], list):
            raise SpecError("profile setup must be a list of shell lines")
        values["setup"] = tuple(values["setup"])
    return ClusterProfile(**values, source=source)

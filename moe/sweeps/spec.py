"""Sweep specs: a base run config, one or more grids of dotted-key axes, a budget, filters.

A sweep TOML looks like

```toml
name = "paper"
base = "../configs/paper/base.toml"    # a run config file (relative to this file) ...
# [base.model] ...                     # ... or the run config inline, as [base.<section>]

[grid]                                 # or several [[grid]] tables: their union
"model.d_model" = [512, 1024, 2048]
"model.n_experts" = [8, 16, 32]
"model.top_k" = [2, 4]

[budget]
tpp = 20                               # tokens = tpp * total parameters (default) ...
# tokens = 125e9                       # ... or a fixed token budget for every run

[filters]                              # top_k <= n_experts is always enforced
min_sparsity = 0.0
max_sparsity = 1.0
max_run_gpu_hours = 1e4                # drop runs estimated above this
max_total_gpu_hours = 1e6              # refuse the sweep above this

[estimate]                             # for GPU-hours; a cluster profile overrides both
mfu = 0.4
gpu_peak_tflops = 989.0
device = "gpu"                         # "cpu": hours are core-hours (pocket studies)
```

`expand(spec)` validates everything before a single run is launched: unknown
keys, empty axes, invalid combinations (all listed at once), duplicate runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moe.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    dumps_toml,
    set_dotted,
    top_k_fits,
    valid_keys,
)
from moe.config.tomlio import read_toml as _read_toml
from moe.errors import BadConfig


class SpecError(BadConfig):
    """A sweep spec is invalid; the one-line message says where and what to do."""


TOP_LEVEL_KEYS = ("name", "description", "base", "grid", "budget", "filters", "estimate")
MAX_LISTED = 12  # invalid combinations named in one error message
MAX_GRID_POINTS = 2000
"""Grid points (before filtering) a spec may have: each is resolved and hashed (about 2 ms
on a loaded 2-core machine), so `plan` and `launch` answer within a few seconds; a larger
grid (1000 x 1000 would take half an hour) is refused at once with its size."""


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Training tokens of every run: exactly one of `tpp` and `tokens`."""

    tpp: float | None = None
    """Tokens per (total) parameter; the default mode, with tpp = 20."""
    tokens: int | None = None
    """A fixed token budget for every run (the paper's 125B-token mode)."""

    def __post_init__(self) -> None:
        if self.tpp is None and self.tokens is None:
            object.__setattr__(self, "tpp", 20.0)
        elif self.tpp is not None and self.tokens is not None:
            raise SpecError(f"[budget] sets both tpp={self.tpp} and tokens={self.tokens}; "
                            "keep one")
        if self.tpp is not None and not (_is_number(self.tpp) and self.tpp > 0):
            raise SpecError(f"budget.tpp={self.tpp!r} must be a positive number")
        if self.tokens is not None:
            if not (_is_number(self.tokens) and self.tokens > 0
                    and float(self.tokens).is_integer()):
                raise SpecError(f"budget.tokens={self.tokens!r} must be a positive whole number")
            object.__setattr__(self, "tokens", int(self.tokens))

    def as_setting(self) -> tuple[str, float | int]:
        """The (dotted key, value) that puts this budget into a run config."""
        return ("train.tokens", self.tokens) if self.tokens is not None else ("train.tpp", self.tpp)


@dataclass(frozen=True, kw_only=True)
class Filters:
    """Which grid points become runs (beyond top_k <= n_experts, always enforced)."""

    min_sparsity: float = 0.0
    """Drop runs with sparsity 1 - k/E below this."""
    max_sparsity: float = 1.0
    """Drop runs with sparsity above this."""
    max_run_gpu_hours: float | None = None
    """Drop runs whose estimated GPU-hours exceed this."""
    max_total_gpu_hours: float | None = None
    """Refuse the whole sweep when its estimated GPU-hours exceed this."""

    def __post_init__(self) -> None:
        for name in ("min_sparsity", "max_sparsity"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise SpecError(f"filters.{name}={value!r} must be a number in [0, 1]")
        if self.min_sparsity > self.max_sparsity:
            raise SpecError(f"filters.min_sparsity={self.min_sparsity} must be <= "
                            f"filters.max_sparsity={self.max_sparsity}")
        for name in ("max_run_gpu_hours", "max_total_gpu_hours"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise SpecError(f"filters.{name}={value!r} must be a positive number")

    def keeps_sparsity(self, sparsity: float) -> bool:
        eps = 1e-12
        return self.min_sparsity - eps <= sparsity <= self.max_sparsity + eps


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Throughput assumed by the GPU-hour estimate: hours = flops / (mfu * peak)."""

    mfu: float = 0.4
    """Model FLOPs utilisation, in (0, 1]."""
    gpu_peak_tflops: float = 989.0
    """Peak dense bf16 TFLOP/s of one GPU (H100 SXM: 989); with device = "cpu", the
    measured TFLOP/s of one core running one run."""
    device: str = "gpu"
    """What an hour is counted on: "gpu" (GPU-hours) or "cpu" (core-hours, one thread
    per run, for pocket studies)."""

    def __post_init__(self) -> None:
        if self.device not in ("gpu", "cpu"):
            raise SpecError(f"estimate.device={self.device!r} must be \"gpu\" or \"cpu\"")
        if not (_is_number(self.mfu) and 0.0 < self.mfu <= 1.0):
            raise SpecError(f"estimate.mfu={self.mfu!r} must be a number in (0, 1]")
        if not (_is_number(self.gpu_peak_tflops) and self.gpu_peak_tflops > 0):
            raise SpecError(f"estimate.gpu_peak_tflops={self.gpu_peak_tflops!r} must be positive")


Axis = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A validated sweep spec (grid points are checked by `expand`)."""

    name: str
    """Short name; used in job names."""
    base: RunConfig
    """The run config every grid point starts from."""
    grids: tuple[tuple[Axis, ...], ...]
    """One or more grids; each is a tuple of (dotted key, values) axes; runs = their union."""
    budget: Budget = field(default_factory=Budget)
    filters: Filters = field(default_factory=Filters)
    estimate: Estimate = field(default_factory=Estimate)
    description: str = ""
    source: str = ""
    """Path the spec was read from ("" when built in memory)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError("the sweep needs a non-empty `name`")
        if not self.grids:
            raise SpecError("the sweep has no [grid]; add at least one axis")
        keys = set(valid_keys())
        for i, grid in enumerate(self.grids):
            where = "[grid]" if len(self.grids) == 1 else f"[[grid]] #{i + 1}"
            if not grid:
                raise SpecError(f"{where} is empty; add at least one axis")
            for key, values in grid:
                if key not in keys:
                    raise SpecError(f"{where}: unknown config key {key!r}; valid keys: "
                                    f"{', '.join(sorted(keys))}")
                if not values:
                    raise SpecError(f"{where}: axis {key!r} is empty; give it at least one value")

    def to_toml(self) -> str:
        """The resolved spec (base inlined), as written to SWEEP_DIR/sweep.toml."""
        head = {"name": self.name, "description": self.description,
                "base": self.base.to_dict(), "budget": _asdict(self.budget),
                "filters": _asdict(self.filters), "estimate": _asdict(self.estimate)}
        text = dumps_toml(head)
        for grid in self.grids:
            text += "\n[[grid]]\n" + dumps_toml({k: list(v) for k, v in grid})
        return text


# --------------------------------------------------------------------------- reading


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a TOML file, or raise SpecError naming `what` it should have been."""
    return _read_toml(path, SpecError, what)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML (grid points are validated by `expand`)."""
    raw = read_toml(path, "sweep spec")
    return spec_from_dict(raw, base_dir=Path(path).parent, source=str(path))


def spec_from_dict(raw: dict[str, Any], *, base_dir: str | Path = ".",
                   source: str = "") -> SweepSpec:
    """Build a SweepSpec from parsed TOML; a string `base` is a path relative to base_dir."""
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise SpecError(f"unknown sweep key(s) {unknown}; valid: {', '.join(TOP_LEVEL_KEYS)}")
    return SweepSpec(
        name=raw.get("name", Path(source).stem if source else ""),
        description=str(raw.get("description", "")),
        base=_read_base(raw.get("base"), Path(base_dir)),
        grids=_read_grids(raw.get("grid")),
        budget=_section(Budget, "budget", raw.get("budget", {})),
        filters=_section(Filters, "filters", raw.get("filters", {})),
        estimate=_section(Estimate, "estimate", raw.get("estimate", {})),
        source=source,
    )


def _read_base(base: Any, base_dir: Path) -> RunConfig:
    if base is None:
        raise SpecError("the sweep needs a `base` run config: a path or [base.model] etc. tables")
    if isinstance(base, str):
        raw = read_toml(base_dir / base, "base config")  # an absolute `base` stays absolute
    elif isinstance(base, dict):
        raw = base
    else:
        raise SpecError("`base` must be a path string or a table of config sections")
    # The budget replaces whatever the base says, so a base without one is fine here.
    train = raw.get("train", {})
    if isinstance(train, dict) and "tokens" not in train and "tpp" not in train:
        raw = {**raw, "train": {**train, "tpp": 20.0}}
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise SpecError(f"base config: {exc}") from None


def _read_grids(grid: Any) -> tuple[tuple[Axis, ...], ...]:
    if grid is None:
        raise SpecError("the sweep has no [grid]; add axes such as \"model.n_experts\" = [8, 16]")
    tables = [grid] if isinstance(grid, dict) else grid
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise SpecError("[grid] must be a table of axes, or [[grid]] an array of such tables")
    grids = []
    for table in tables:
        axes = []
        for key, values in table.items():
            if isinstance(values, dict):  # `model.d_model = [...]` unquoted parses as a table
                raise SpecError(f"grid axis {key!r} is a table; quote dotted keys: "
                                f'"{key}.<field>" = [...]')
            axes.append((key, tuple(values) if isinstance(values, list) else (values,)))
        grids.append(tuple(axes))
    return tuple(grids)


def _section(cls: type, name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise SpecError(f"[{name}] must be a table")
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise SpecError(f"unknown key(s) {unknown} in [{name}]; valid: {', '.join(valid)}")
    return cls(**values)


# --------------------------------------------------------------------------- expanding


@dataclass(frozen=True, kw_only=True)
class Expansion:
    """The runs of a spec and what was filtered out on the way."""

    configs: tuple[RunConfig, ...]
    """Resolved run configs, in grid order."""
    n_points: int
    """Grid points before filtering."""
    n_filtered: int
    """Points dropped by top_k <= n_experts and the sparsity bounds."""


def expand(spec: SweepSpec) -> Expansion:
    """Resolve every grid point into a RunConfig; raise SpecError listing all bad points."""
    size = grid_size(spec)
    if size > MAX_GRID_POINTS:
        raise SpecError(f"the grid has {size:,} points, more than the {MAX_GRID_POINTS:,} a "
                        "sweep may have; narrow its axes or split it into several sweeps")
    configs, invalid, seen, duplicates = [], [], {}, []
    n_points = n_filtered = 0
    for overrides in _grid_points(spec):
        n_points += 1
        try:
            cfg = _resolve(spec, overrides)
        except ConfigError as exc:
            invalid.append(f"{_label(overrides)}: {exc}")
            continue
        if cfg is None or not spec.filters.keeps_sparsity(cfg.model.sparsity):
            n_filtered += 1
            continue
        run_id = config_hash(cfg)
        if run_id in seen:
            duplicates.append(f"{_label(overrides)} = {_label(seen[run_id])}")
            continue
        seen[run_id] = overrides
        configs.append(cfg)
    if invalid:
        raise SpecError(f"{len(invalid)} invalid grid combination(s): "
                        + "; ".join(invalid[:MAX_LISTED])
                        + ("; ..." if len(invalid) > MAX_LISTED else ""))
    if duplicates:
        raise SpecError(f"{len(duplicates)} duplicate run(s) (same resolved config): "
                        + "; ".join(duplicates[:MAX_LISTED]))
    if not configs:
        raise SpecError(f"every one of the {n_points} grid points was filtered out "
                        "(top_k <= n_experts and the sparsity bounds)")
    return Expansion(configs=tuple(configs), n_points=n_points, n_filtered=n_filtered)


def grid_size(spec: SweepSpec) -> int:
    """Grid points before filtering: the sum over [[grid]] tables of their axes' product."""
    return sum(math.prod(len(values) for _, values in grid) for grid in spec.grids)


def _grid_points(spec: SweepSpec):
    for grid in spec.grids:
        keys = [key for key, _ in grid]
        for values in itertools.product(*(vals for _, vals in grid)):
            yield tuple(zip(keys, values, strict=True))


def _resolve(spec: SweepSpec, point: tuple[tuple[str, Any], ...]) -> RunConfig | None:
    """base <- budget <- grid point; None when top_k > n_experts (silently filtered)."""
    data = spec.base.to_dict()
    set_dotted(data, *spec.budget.as_setting())
    for key, value in point:
        set_dotted(data, key, value)
    model = data["model"]
    if _is_number(model.get("top_k")) and _is_number(model.get("n_experts")) \
            and not top_k_fits(model["top_k"], model["n_experts"]):
        return None
    return apply_overrides(data, ())


def _label(point: tuple[tuple[str, Any], ...]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in point)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}

"""Run configuration (see `docs/architecture.md`, "Config contract").

`RunConfig` and its sections live in `schema`; `load_config` reads TOML and
applies `--set` overrides; `config_hash` is the run id.
"""

from moe.config.build import config_from_dict
from moe.config.overrides import (
    ConfigNotice,
    apply_overrides,
    load_config,
    parse_value,
    set_dotted,
    valid_keys,
)
from moe.config.run_id import config_hash, legacy_config_hash, weight_fields
from moe.config.schema import (
    DEVICES,
    EXPERT_BACKENDS,
    PARALLEL_DATA,
    PRECISIONS,
    SCHEDULES,
    SECTIONS,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    field_names,
    sparsity,
    top_k_fits,
)
from moe.config.tomlio import dumps_toml, read_toml

__all__ = [
    "DEVICES", "EXPERT_BACKENDS", "PARALLEL_DATA", "PRECISIONS", "SCHEDULES", "SECTIONS",
    "ConfigError", "ConfigNotice", "DataConfig", "EvalConfig", "LogConfig", "ModelConfig",
    "ParallelConfig",
    "RunConfig", "TrainConfig", "apply_overrides",
    "config_from_dict", "config_hash", "dumps_toml", "field_names", "legacy_config_hash",
    "load_config", "parse_value", "read_toml", "set_dotted", "sparsity", "valid_keys",
    "top_k_fits", "weight_fields",
]

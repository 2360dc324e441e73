"""Reading a run config file and applying `--set section.key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe.config.build import config_from_dict
from moe.config.schema import SECTIONS, ConfigError, RunConfig, field_names
from moe.config.tomlio import parse_value, read_toml


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML run config and apply `--set key=value` overrides."""
    return apply_overrides(read_toml(path, ConfigError, "config file"), overrides)


def apply_overrides(raw: dict[str, Any] | RunConfig, overrides: list[str] | tuple[str, ...]
                    ) -> RunConfig:
    """Apply dotted `section.key=value` strings; values are parsed as TOML literals.

    `model.n_experts=16`, `eval.tasks=["pocket-memorization"]`, `data.source=path/to/shards`
    (a bare word that is not a TOML literal is taken as a string).
    """
    data = raw.to_dict() if isinstance(raw, RunConfig) else _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(data, key.strip(), parse_value(text.strip()))
    return config_from_dict(data)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.field` in nested dicts, rejecting unknown keys with the valid ones."""
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS:
        raise ConfigError(f"unknown config key {key!r}; keys look like section.field with section "
                          f"in {sorted(SECTIONS)}")
    valid = field_names(SECTIONS[section])
    if name not in valid:
        raise ConfigError(f"unknown config key {key!r}; valid [{section}] keys: "
                          f"{', '.join(valid)}")
    table = data.setdefault(section, {})
    table[name] = value
    # The budget is either tokens or tpp: setting one on the command line switches mode.
    budget_pair = {"tokens": "tpp", "tpp": "tokens"}
    if section == "train" and name in budget_pair:
        table.pop(budget_pair[name], None)


def valid_keys() -> list[str]:
    """Every dotted key a config accepts (for error messages and --help)."""
    return [f"{s}.{n}" for s, cls in SECTIONS.items() for n in field_names(cls)]


def _deepcopy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}

"""Reading a run config file and applying `--set section.key=value` overrides.

The token budget is exactly one of `train.tokens` and `train.tpp`. One policy for both
places a budget can come from: giving both in one place (a config file's [train], or the
`--set` list) is refused; a `--set` of one on a file that gives the other replaces the
file's, with a `ConfigNotice` warning that names what was replaced (the command line is
where one switches a config's budget mode).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from moe.config.build import config_from_dict
from moe.config.schema import SECTIONS, ConfigError, RunConfig, field_names
from moe.config.tomlio import parse_value, read_toml

BUDGET_KEYS = ("train.tokens", "train.tpp")


class ConfigNotice(UserWarning):
    """An override replaced a key the config file set (applied, and said so)."""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML run config and apply `--set key=value` overrides (see the module's
    docstring for the budget keys)."""
    raw = read_toml(path, ConfigError, "config file")
    budget = {key.strip(): text.strip() for key, _, text in (o.partition("=") for o in overrides)
              if key.strip() in BUDGET_KEYS}
    if len(budget) > 1:
        raise ConfigError(f"--set gives both {' and '.join(sorted(budget))}; the budget is "
                          "exactly one of them (as in a config file): drop one")
    cfg = apply_overrides(raw, overrides)
    for key, text in budget.items():
        other = next(k for k in BUDGET_KEYS if k != key)
        old = (raw.get("train") or {}).get(other.split(".")[1])
        if old is not None:
            warnings.warn(f"--set {key}={text} replaces {other}={old} of {path} (the budget "
                          f"is one of them; `moe sweep plan` or the run's status shows its "
                          "tokens)", ConfigNotice, stacklevel=2)
    return cfg


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

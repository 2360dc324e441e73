"""Build a validated `RunConfig` from nested dicts (parsed TOML), with type checks."""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from moe.config.schema import SECTIONS, ConfigError, RunConfig, field_names


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (as parsed from TOML)."""
    if not isinstance(raw, dict):
        raise ConfigError("a run config must be a table with sections [model], [train], [data], "
                          "[eval]")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        if name == "train":
            values = _budget_mode(values)
        sections[name] = _build_section(name, cls, values)
    return RunConfig(**sections)


def _budget_mode(train: dict[str, Any]) -> dict[str, Any]:
    """A [train] table must give exactly one of tokens and tpp (None counts as absent)."""
    given = [k for k in ("tokens", "tpp") if train.get(k) is not None]
    if len(given) != 1:
        raise ConfigError("set exactly one of train.tokens and train.tpp in [train] "
                          f"(got {' and '.join(given) if given else 'neither'})")
    other = "tpp" if given == ["tokens"] else "tokens"
    return {**train, other: None}


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    valid = field_names(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in valid:
            raise ConfigError(f"unknown config key '{section}.{name}'; valid [{section}] keys: "
                              f"{', '.join(valid)}")
        kwargs[name] = _coerce(f"{section}.{name}", value, hints[name])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - kw_only dataclass, names already checked
        raise ConfigError(f"[{section}]: {exc}") from None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(key, v, item_tp) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)  # lets `tokens = 1.25e11` mean an integer budget
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be finite, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - all fields use the types above
        raise ConfigError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))

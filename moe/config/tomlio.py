"""TOML in and out for configs, sweep specs and cluster profiles (no dependency).

`read_toml` parses a file with a one-line error of the caller's type; `dumps_toml`
writes nested dicts of scalars and lists (what a config or spec holds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def read_toml(path: str | Path, error: type[Exception] = ValueError,
              what: str = "TOML file") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file raises `error` with a one-line message
    that names `what` the file should have been."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None


def parse_value(text: str) -> Any:
    """Parse a TOML literal (`16`, `1e-3`, `true`, `"x"`, `[1, 2]`); else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def dumps_toml(data: dict[str, Any]) -> str:
    """Write nested dicts of scalars and lists as TOML (tables, then nested tables).

    Keys whose value is None are omitted, since TOML has no null; reading the
    file back gives the field's default, which for every optional field here is
    None as well.
    """
    lines: list[str] = []
    _dump_table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(lines: list[str], prefix: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        _dump_table(lines, [*prefix, key], value)


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")

"""Config settings checked against the types of their defaults: every section reads through
here; and whole numbers read from request text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from engine.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def coerce_setting(value: Any, default: Any, path: str, *, from_env: bool = False) -> Any:
    """`value` as the type of `default`; ConfigError naming `path` if it cannot be.

    Values from the environment are strings: `from_env` lets them stand for
    booleans, numbers and comma-separated lists. TOML values must have the type.
    """
    kind = type(default)
    if kind is tuple:
        if isinstance(value, str) and from_env:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path} must be a list of strings", field=path)
        return tuple(value)
    if kind is bool:
        if isinstance(value, str) and from_env and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false", field=path)
        return value
    if kind in (int, float):
        if isinstance(value, str) and from_env:
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path} must be a number, got {value!r}", field=path) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number", field=path)
        if kind is int and not float(value).is_integer():
            raise ConfigError(f"{path} must be a whole number", field=path)
        return kind(value)
    if not isinstance(value, str):
        raise ConfigError(f"{path} must be a string", field=path)
    return value


def section_values(
    cls: type,
    table: Mapping[str, Any],
    section: str,
    env: Mapping[str, str],
    env_prefix: str,
    *,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The settings of dataclass `cls` given in `table` ([section]) or as env_prefix+KEY.

    An unknown key is a ConfigError naming it; the environment wins over the file.
    Fields in `skip` are parsed by the caller (nested tables, arrays of tables).
    """
    defaults = cls()
    known = [f.name for f in fields(cls) if f.name not in skip]
    for key in table:
        if key not in known:
            raise ConfigError(f"unknown setting {section}.{key}", field=f"{section}.{key}")
    values: dict[str, Any] = {}
    for key in known:
        default = getattr(defaults, key)
        env_name = env_prefix + key.upper()
        if env_name in env:
            values[key] = coerce_setting(env[env_name], default, env_name, from_env=True)
        elif key in table:
            values[key] = coerce_setting(table[key], default, f"{section}.{key}")
    return values


def whole_number(text: str, max_digits: int = 18) -> int | None:
    """`text` as a non-negative int if it is at most `max_digits` ASCII digits, else None.

    str.isdigit alone also accepts digits int() refuses ("²") and lengths past
    int()'s 4,300-digit limit: either would be a 500 instead of a 4xx.
    """
    if len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None

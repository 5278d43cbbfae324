"""Durations ("15m", "1d12h"), frequency caps ("2/1d") and quiet hours ("21:00-08:00")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw])+$")
_CAP = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\S+)\s*$")
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_duration(value: Any) -> float:
    """Seconds from "90s", "15m", "24h", "7d", "2w", "1d12h" or a number of seconds.

    >>> parse_duration("1d12h")
    129600.0
    """
    if isinstance(value, bool):
        raise ValueError("a duration must be a string such as '15m' or a number of seconds")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a duration must be a string such as '15m' or a number of seconds")
    text = value.strip().replace(" ", "")
    if text in ("0", "0s"):
        return 0.0
    if not _DURATION.match(text):
        raise ValueError(
            f"{value!r} is not a duration (use s, m, h, d or w: '15m', '24h', '1d12h')"
        )
    return sum(float(n) * UNITS[u] for n, u in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of `seconds`: 900 -> "15m", 90000 -> "1d1h"."""
    if seconds == 0:
        return "0s"
    out = []
    rest = seconds
    for unit in ("d", "h", "m"):
        size = UNITS[unit]
        if rest >= size:
            whole = int(rest // size)
            out.append(f"{whole}{unit}")
            rest -= whole * size
    if rest:
        out.append(f"{rest:g}s")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Cap:
    """At most `max` sends in any rolling window of `per` seconds."""

    max: int
    per: float

    def __str__(self) -> str:
        return f"{self.max}/{format_duration(self.per)}"


def parse_cap(value: Any) -> Cap:
    """A cap from "2/1d", "2 per 1d" or {max = 2, per = "1d"}."""
    if isinstance(value, dict):
        unknown = set(value) - {"max", "per"}
        if unknown:
            raise ValueError(f"unknown cap key {sorted(unknown)[0]!r} (use max and per)")
        count, per = value.get("max"), value.get("per")
    elif isinstance(value, str) and (match := _CAP.match(value)):
        count, per = int(match.group(1)), match.group(2)
    else:
        raise ValueError(f"{value!r} is not a cap (use '2/1d' or {{max = 2, per = '1d'}})")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError("a cap's max must be a whole number, 0 or more")
    window = parse_duration(per)
    if window <= 0:
        raise ValueError("a cap's window must be longer than 0s")
    return Cap(count, window)


def parse_quiet_hours(value: Any) -> tuple[int, int] | None:
    """(start, end) minutes of the local day from "21:00-08:00" or {start, end}; None for none."""
    if value is False or value is None or value == "":
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"start", "end"}
        if unknown:
            raise ValueError(f"unknown quiet_hours key {sorted(unknown)[0]!r} (use start and end)")
        start, end = value.get("start"), value.get("end")
    elif isinstance(value, str) and value.count("-") == 1:
        start, end = (part.strip() for part in value.split("-"))
    else:
        raise ValueError(f"{value!r} is not quiet hours (use '21:00-08:00' or false)")
    minutes = []
    for part in (start, end):
        match = _CLOCK.match(part) if isinstance(part, str) else None
        if match is None:
            raise ValueError(f"{part!r} is not a time of day (use HH:MM, 24-hour)")
        minutes.append(int(match.group(1)) * 60 + int(match.group(2)))
    if minutes[0] == minutes[1]:
        raise ValueError("quiet hours must start and end at different times")
    return minutes[0], minutes[1]

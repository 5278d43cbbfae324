"""What stands between a due step and a send: quiet hours, caps, priority, variants.

Pure functions over plain data; the customer's send history is a list of
`[ts, rule name]` pairs kept in the journey.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.rules.durations import Cap

HOLDOUT = "holdout"
_BUCKETS = 10_000


_UNSEEN = object()


class Zones:
    """ZoneInfo by name, cached (None for unknown names), and the default zone."""

    def __init__(self, default: str = "UTC", *, limit: int = 1024):
        self.default = ZoneInfo(default)
        self._cache: dict[str, ZoneInfo] = {}
        self._limit = limit

    def find(self, name: str | None) -> ZoneInfo | None:
        """The zone called `name`, or None when it is missing or unknown."""
        if not name:
            return None
        zone = self._cache.get(name, _UNSEEN)
        if zone is _UNSEEN:
            try:
                zone = ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError, TypeError):
                zone = None
            if len(self._cache) < self._limit:
                self._cache[name] = zone
        return zone


def is_quiet(local: datetime, quiet: tuple[int, int]) -> bool:
    """True when the local wall-clock time falls inside the quiet hours [start, end)."""
    minute = local.hour * 60 + local.minute
    start, end = quiet
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # the quiet hours span midnight


def next_allowed(at: float, zone: ZoneInfo, quiet: tuple[int, int] | None) -> float:
    """`at` itself when sending is allowed then, else the first minute after the quiet hours.

    >>> from zoneinfo import ZoneInfo
    >>> paris = ZoneInfo("Europe/Paris")
    >>> t = datetime(2024, 3, 4, 22, 30, tzinfo=paris).timestamp()
    >>> datetime.fromtimestamp(next_allowed(t, paris, (21 * 60, 8 * 60)), paris).isoformat()
    '2024-03-05T08:00:00+01:00'
    """
    if quiet is None:
        return at
    local = datetime.fromtimestamp(at, zone)
    if not is_quiet(local, quiet):
        return at
    end_h, end_m = divmod(quiet[1], 60)
    found = []
    for day in (local.date(), local.date() + timedelta(days=1)):
        # Both readings of the end's wall-clock time: at a DST fall-back it happens
        # twice (the second may be the one still ahead); in a spring-forward gap it
        # never does, and the first allowed instant is where the clocks jump.
        first, second = sorted(
            datetime(day.year, day.month, day.day, end_h, end_m, tzinfo=zone, fold=f).timestamp()
            for f in (0, 1)
        )
        for ts in (first, second):
            if ts >= at and not is_quiet(datetime.fromtimestamp(ts, zone), quiet):
                found.append(ts)
        skipped = datetime.fromtimestamp(first, zone)
        if (skipped.hour, skipped.minute) != (end_h, end_m) and second > max(first, at):
            found.append(_first_allowed(max(first, at), second, zone, quiet))
    return min(found) if found else at


def _first_allowed(lo: float, hi: float, zone: ZoneInfo, quiet: tuple[int, int]) -> float:
    """The first instant in [lo, hi] outside the quiet hours, to the second (hi is)."""
    lo, hi = math.floor(lo), math.ceil(hi)
    if not is_quiet(datetime.fromtimestamp(lo, zone), quiet):
        return float(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if is_quiet(datetime.fromtimestamp(mid, zone), quiet):
            lo = mid
        else:
            hi = mid
    return float(hi)


def cap_free_at(
    history: Iterable[list], caps: Iterable[Cap], at: float, rule: str | None
) -> float | None:
    """None if a send at `at` stays within every cap, else the earliest time it would.

    `rule` limits the count to that rule's sends (None: all sends). Sends
    recorded later than `at` count too, so a late event cannot squeeze in
    over a cap.
    """
    free = None
    for cap in caps:
        lo = at - cap.per
        times = sorted(ts for ts, name in history if ts > lo and (rule is None or name == rule))
        if len(times) >= cap.max:
            if cap.max == 0:
                return float("inf")
            candidate = times[len(times) - cap.max] + cap.per
            free = candidate if free is None else max(free, candidate)
    return free


def assign(
    experiment: str, customer: str, variants: tuple[tuple[str, float], ...], holdout: float
) -> str | None:
    """Sticky variant for `customer`: "holdout", a variant name, or None without variants.

    A blake2b hash of experiment and customer decides, so the same customer
    always lands in the same arm, in any process, without storing anything.
    """
    digest = hashlib.blake2b(f"{experiment}\x1f{customer}".encode(), digest_size=8).digest()
    number = int.from_bytes(digest, "big")
    bucket = number % _BUCKETS
    if holdout > 0 and bucket < holdout * _BUCKETS / 100:
        return HOLDOUT
    if not variants:
        return None
    total = sum(weight for _, weight in variants)
    point = ((number // _BUCKETS) % 1_000_000) / 1_000_000 * total
    for name, weight in variants:
        if point < weight:
            return name
        point -= weight
    return variants[-1][0]

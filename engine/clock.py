"""Clocks: the only place the engine learns the time, so tests can drive it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Source of "now" in epoch seconds."""

    def now(self) -> float: ...


class SystemClock:
    """Wall-clock time."""

    def now(self) -> float:
        """Current epoch seconds."""
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for tests and the simulator."""

    def __init__(self, start: float = 1_700_000_000.0):
        self._now = float(start)

    def now(self) -> float:
        """The clock's current epoch seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` and return the new time."""
        if seconds < 0:
            raise ValueError("a clock only moves forward")
        self._now += seconds
        return self._now

    def set(self, epoch_seconds: float) -> None:
        """Jump to an absolute time (never backwards)."""
        if epoch_seconds < self._now:
            raise ValueError("a clock only moves forward")
        self._now = float(epoch_seconds)

"""One absolute deadline per request, and the jobs a request fans out to.

Each job runs with `min(its own budget, what remains)` as its timeout and ends
with an Outcome: its value, a timeout, or the reason it raised, so one bad block
costs only itself. The answer itself never waits for a job past the deadline
(engine.content.service assembles it in the deadline's own callback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT, ERROR = "timeout", "error"


class BlockFailure(Exception):
    """A block could not produce its content; `reason` is a short code for the answer."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute point on the event loop's clock (seconds)."""

    at: float

    def due(self, budget_s: float | None) -> float:
        """The earlier of this deadline and `budget_s` from now."""
        if not budget_s:
            return self.at
        return min(self.at, asyncio.get_running_loop().time() + budget_s)


@dataclass(frozen=True, slots=True)
class Job:
    """One unit of a fan-out: a name, its own budget, and the coroutine to run."""

    name: str
    budget_s: float | None
    run: Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one job ended with: its value, or why it has none."""

    name: str
    value: Any = None
    failure: str | None = None
    detail: str = ""


async def _guarded(job: Job, due: float) -> Outcome:
    try:
        async with asyncio.timeout_at(due):
            return Outcome(job.name, await job.run())
    except TimeoutError:
        return Outcome(job.name, failure=TIMEOUT)
    except BlockFailure as exc:
        return Outcome(job.name, failure=exc.reason, detail=str(exc))
    except Exception as exc:  # a bug in one block must not take the others down
        log.warning("content block %s failed: %r", job.name, exc)
        return Outcome(job.name, failure=ERROR, detail=type(exc).__name__)


def start(job: Job, deadline: Deadline) -> asyncio.Task:
    """Run `job` now, bounded by its budget and the deadline."""
    return asyncio.get_running_loop().create_task(_guarded(job, deadline.due(job.budget_s)))


class LagMeter:
    """How late the event loop has been running timers lately (seconds).

    A busy or CPU-starved process runs a deadline's timer late by about this much,
    so a fan-out that keeps it back still answers on time.
    """

    def __init__(self, *, interval_s: float = 0.01, window: int = 100):
        self.interval_s = interval_s
        self._lags: deque[float] = deque(maxlen=window)  # window x interval: about 1 s
        self._worst = 0.0  # kept at each sample: every answer asks, 100 samples a second
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start sampling on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def record(self, lag_s: float) -> None:
        """Add one observation (the sampler does this; tests may too)."""
        self._lags.append(max(lag_s, 0.0))
        self._worst = max(self._lags)

    def recent(self) -> float:
        """The worst lag of the last window (0 before any sample)."""
        return self._worst

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(loop.time() - due)

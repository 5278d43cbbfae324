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


# Made per answer, never changed after: not frozen, since a frozen dataclass sets every
# field through object.__setattr__ (about three times the cost of an instance).
@dataclass(slots=True)
class Deadline:
    """An absolute point on the event loop's clock (seconds)."""

    at: float

    def due(self, budget_s: float | None) -> float:
        """The earlier of this deadline and `budget_s` from now."""
        if not budget_s:
            return self.at
        return min(self.at, asyncio.get_running_loop().time() + budget_s)


@dataclass(slots=True)
class Job:
    """One unit of a fan-out: a name, its own budget, and the coroutine to run."""

    name: str
    budget_s: float | None
    run: Callable[[], Awaitable[Any]]


@dataclass(slots=True)
class Outcome:
    """What one job ended with: its value, or why it has none."""

    name: str
    value: Any = None
    failure: str | None = None
    detail: str = ""


def failed(name: str, exc: Exception) -> Outcome:
    """What a job that raised `exc` ends with: a timeout, its BlockFailure's reason,
    or an error (logged: a bug in one block must not take the others down)."""
    if isinstance(exc, TimeoutError):
        return Outcome(name, failure=TIMEOUT)
    if isinstance(exc, BlockFailure):
        return Outcome(name, failure=exc.reason, detail=str(exc))
    log.warning("content block %s failed: %r", name, exc)
    return Outcome(name, failure=ERROR, detail=type(exc).__name__)


async def _guarded(job: Job, due: float) -> Outcome:
    try:
        async with asyncio.timeout_at(due):
            return Outcome(job.name, await job.run())
    except Exception as exc:
        return failed(job.name, exc)


def start(job: Job, deadline: Deadline) -> asyncio.Task:
    """Run `job` now, bounded by its budget and the deadline."""
    return asyncio.get_running_loop().create_task(_guarded(job, deadline.due(job.budget_s)))


def follow(
    name: str,
    source: asyncio.Future,
    convert: Callable[[Any], Any],
    budget_s: float | None,
    deadline: Deadline,
) -> asyncio.Future[Outcome]:
    """A job whose work is already running as `source` (a load other requests may share),
    without a task of its own: a future of its Outcome, `convert(source's result)` or
    why there is none, bounded by its budget.

    The deadline is the caller's to keep (the answer cancels what is still pending
    when its own deadline timer fires), so a job gets a timer only when its budget
    ends first. Ending early (that timer, or cancelling the returned future) leaves
    `source` running for whoever else waits on it. A cancelled `source` cancels the job.
    """
    loop = asyncio.get_running_loop()
    job: asyncio.Future[Outcome] = loop.create_future()

    def settle(done: asyncio.Future) -> None:
        if job.done():
            return
        if done.cancelled():
            job.cancel()
            return
        exc = done.exception()
        if exc is None:
            try:
                outcome = Outcome(name, convert(done.result()))
            except Exception as error:
                outcome = failed(name, error)
        elif isinstance(exc, Exception):
            outcome = failed(name, exc)
        else:  # KeyboardInterrupt and the like: not a block's failure to report
            job.set_exception(exc)
            return
        job.set_result(outcome)

    def expire() -> None:
        if not job.done():
            job.set_result(Outcome(name, failure=TIMEOUT))

    due = deadline.due(budget_s)
    timer = loop.call_at(due, expire) if due < deadline.at else None

    def release(_: asyncio.Future) -> None:
        if timer is not None:
            timer.cancel()
        if not source.done():
            source.remove_done_callback(settle)

    source.add_done_callback(settle)
    job.add_done_callback(release)
    return job


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

"""When to retry, when to stop calling an ESP, and how fast to call it (pure; time passed in).

- `backoff(attempt, ...)`: exponential backoff with full jitter.
- `CircuitBreaker`: per ESP; opens after N failures in a row, lets one probe through
  after `reset_s`, closes on a success.
- `TokenBucket`: sends per second per ESP; `reserve(now)` says how long to wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from engine.coerce import whole_number


def backoff(
    attempt: int,
    *,
    initial_s: float,
    max_s: float,
    retry_after_s: float | None = None,
    max_retry_after_s: float = 300.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before attempt `attempt + 1` after `attempt` failed (1-based).

    Full jitter: uniform in [0, min(max_s, initial_s * 2**(attempt-1))], so many
    dispatchers retrying one ESP spread out. A server's Retry-After wins (capped
    at `max_retry_after_s`), plus up to 10% jitter so the retries do not stampede.

    >>> backoff(3, initial_s=0.5, max_s=60, rand=lambda: 1.0)
    2.0
    >>> backoff(1, initial_s=0.5, max_s=60, retry_after_s=7, rand=lambda: 0.0)
    7.0
    """
    if retry_after_s is not None and retry_after_s >= 0:
        base = min(retry_after_s, max_retry_after_s)
        return base + base * 0.1 * rand()
    ceiling = min(max_s, initial_s * 2.0 ** max(attempt - 1, 0))
    return ceiling * rand()


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    seconds = whole_number(value)
    if seconds is not None:
        return float(seconds)
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - now, 0.0)


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Stops calls to an ESP that keeps failing; one probe at a time once `reset_s` passed."""

    def __init__(self, *, failures: int, reset_s: float):
        self.threshold = failures
        self.reset_s = reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    def state(self, now: float) -> str:
        """closed, open or half_open at `now`."""
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if now - self.opened_at >= self.reset_s else OPEN

    def allow(self, now: float) -> bool:
        """True if a call may go to the ESP now (in half-open, only one probe at a time)."""
        state = self.state(now)
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def refuses(self, now: float) -> bool:
        """True if `allow(now)` would say no (open, or half-open with its probe out)."""
        state = self.state(now)
        return state == OPEN or (state == HALF_OPEN and self._probing)

    def retry_in(self, now: float) -> float:
        """Seconds until the breaker lets a probe through (0 when closed)."""
        if self.opened_at is None:
            return 0.0
        return max(self.reset_s - (now - self.opened_at), 0.0)

    def success(self) -> None:
        """A call succeeded: close."""
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def release(self) -> None:
        """The probe ended before its outcome was known (a bug, a cancel): free its place."""
        self._probing = False

    def failure(self, now: float) -> None:
        """A call failed (a 5xx, a timeout, a refused connection): count; open at the threshold."""
        self.failures += 1
        if self._probing or self.failures >= self.threshold:
            self.opened_at = now
        self._probing = False


class TokenBucket:
    """`rate` sends per second with bursts of up to `burst`; rate 0 means unlimited."""

    def __init__(self, rate: float, *, burst: float | None = None, now: float = 0.0):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.tokens = self.burst
        self.updated = now

    def reserve(self, now: float) -> float:
        """Take one token; returns seconds to wait before using it (0: go now).

        A reservation may drive the bucket below zero: later callers wait longer,
        so concurrent senders queue fairly instead of polling.
        """
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def refund(self) -> None:
        """Give back a reserved token that was not used (the call never went out)."""
        if self.rate > 0:
            self.tokens = min(self.burst, self.tokens + 1.0)

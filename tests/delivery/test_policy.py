"""Retry timing, the circuit breaker and the rate limiter: pure, time passed in."""

from __future__ import annotations

import pytest

from engine.delivery.policy import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    TokenBucket,
    backoff,
    parse_retry_after,
)


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [(1, 1.0, 0.5), (2, 1.0, 1.0), (3, 1.0, 2.0), (10, 1.0, 60.0), (3, 0.5, 1.0), (3, 0.0, 0.0)],
)
def test_backoff_doubles_with_full_jitter_up_to_the_cap(
    attempt: int, rand: float, expected: float
) -> None:
    assert backoff(attempt, initial_s=0.5, max_s=60, rand=lambda: rand) == expected


@pytest.mark.parametrize(
    ("retry_after", "rand", "expected"), [(7, 0.0, 7.0), (7, 1.0, 7.7), (900, 0.0, 300.0)]
)
def test_retry_after_wins_capped_with_a_little_jitter(
    retry_after: float, rand: float, expected: float
) -> None:
    got = backoff(
        1,
        initial_s=0.5,
        max_s=60,
        retry_after_s=retry_after,
        max_retry_after_s=300,
        rand=lambda: rand,
    )
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        ("1.5", 1.5),
        (None, None),
        ("soon", None),
        ("Wed, 18 Nov 2026 10:00:30 GMT", 30.0),
        ("Wed, 18 Nov 2026 09:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = 1_794_996_000.0  # 2026-11-18 10:00:00 UTC
    assert parse_retry_after(header, now) == expected


def test_breaker_opens_after_failures_in_a_row_and_probes_once() -> None:
    breaker = CircuitBreaker(failures=3, reset_s=10)
    for t in range(2):
        assert breaker.allow(t)
        breaker.failure(t)
    breaker.success()  # a success resets the count
    for t in range(3):
        breaker.failure(float(t))
    assert breaker.state(2.0) == OPEN and not breaker.allow(5.0) and breaker.refuses(5.0)
    assert breaker.retry_in(5.0) == pytest.approx(7.0)
    assert breaker.state(12.0) == HALF_OPEN
    assert not breaker.refuses(12.0)
    assert breaker.allow(12.0) and not breaker.allow(12.0)  # one probe at a time
    assert breaker.refuses(12.0)  # its probe is out
    breaker.failure(12.5)  # the probe failed: open again for reset_s
    assert breaker.state(20.0) == OPEN and breaker.state(22.5) == HALF_OPEN
    assert breaker.allow(22.5)
    breaker.success()
    assert breaker.state(22.6) == CLOSED and breaker.allow(22.6)


def test_token_bucket_spaces_sends_at_the_rate() -> None:
    bucket = TokenBucket(10.0, burst=2, now=0.0)
    waits = [bucket.reserve(0.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3])
    assert bucket.reserve(1.0) == 0.0  # refilled after a second
    assert TokenBucket(0).reserve(0.0) == 0.0  # 0: unlimited


def test_a_refunded_token_is_as_if_never_taken() -> None:
    bucket = TokenBucket(10.0, burst=2, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == pytest.approx([0.0, 0.0, 0.1])
    bucket.refund()  # the third call never went out
    assert bucket.reserve(0.0) == pytest.approx(0.1)  # not 0.2
    bucket.refund()
    bucket.refund()
    bucket.refund()  # never above the burst
    assert [bucket.reserve(0.0) for _ in range(3)] == pytest.approx([0.0, 0.0, 0.1])

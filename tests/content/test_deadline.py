"""The fan-out: every job's outcome by the deadline, whatever the jobs do."""

from __future__ import annotations

import asyncio
import time

from engine.content.deadline import BlockFailure, Deadline, Job, LagMeter, fan_out


async def value(v: object, delay: float = 0.0) -> object:
    if delay:
        await asyncio.sleep(delay)
    return v


async def hang() -> None:
    await asyncio.Event().wait()


async def raise_failure() -> None:
    raise BlockFailure("http_503")


async def raise_bug() -> None:
    raise KeyError("oops")


async def test_each_job_ends_with_its_value_or_reason_within_the_deadline() -> None:
    started = time.perf_counter()
    outcomes = await fan_out(
        [
            Job("fast", None, lambda: value(1)),
            Job("ok_later", None, lambda: value(2, 0.02)),
            Job("own_budget", 0.03, lambda: value(3, 0.2)),
            Job("hangs", None, hang),
            Job("fails", None, raise_failure),
            Job("bug", None, raise_bug),
        ],
        Deadline.after(0.12),
    )
    elapsed = time.perf_counter() - started
    assert 0.11 < elapsed < 0.12 + 0.03
    assert outcomes["fast"].value == 1 and outcomes["ok_later"].value == 2
    assert {n: o.failure for n, o in outcomes.items()} == {
        "fast": None,
        "ok_later": None,
        "own_budget": "timeout",
        "hangs": "timeout",
        "fails": "http_503",
        "bug": "error",
    }


async def test_a_job_that_swallows_cancellation_is_still_cut_at_the_deadline() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:  # ignores its first cancellation (a buggy block)
            await asyncio.sleep(0.3)

    started = time.perf_counter()
    outcomes = await fan_out([Job("stubborn", None, stubborn)], Deadline.after(0.05))
    assert time.perf_counter() - started < 0.05 + 0.03  # not awaited past the deadline
    assert outcomes["stubborn"].failure == "timeout"


async def test_the_lag_meter_sees_a_loop_that_runs_timers_late() -> None:
    meter = LagMeter(interval_s=0.005, window=50)
    meter.start()
    try:
        await asyncio.sleep(0.03)
        quiet = meter.recent()
        time.sleep(0.06)  # the loop is busy: no timer can run meanwhile
        await asyncio.sleep(0.02)
        assert quiet < 0.03 and meter.recent() >= 0.05
    finally:
        await meter.stop()

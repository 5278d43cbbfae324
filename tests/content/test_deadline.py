"""The fan-out: every job's outcome by the deadline, whatever the jobs do."""

from __future__ import annotations

import asyncio
import time

from engine.content.deadline import (
    BlockFailure,
    Deadline,
    Job,
    LagMeter,
    Outcome,
    follow,
    start,
)


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


def after(seconds: float) -> Deadline:
    return Deadline(asyncio.get_running_loop().time() + seconds)


async def outcomes_of(jobs: list[Job], deadline: Deadline) -> dict[str, Outcome]:
    """Start every job and wait for each to end by itself (its own timeout)."""
    done = await asyncio.gather(*(start(job, deadline) for job in jobs))
    return {outcome.name: outcome for outcome in done}


async def test_each_job_ends_with_its_value_or_reason_by_the_deadline() -> None:
    started = time.perf_counter()
    outcomes = await outcomes_of(
        [
            Job("fast", None, lambda: value(1)),
            Job("ok_later", None, lambda: value(2, 0.02)),
            Job("own_budget", 0.03, lambda: value(3, 0.2)),
            Job("hangs", None, hang),
            Job("fails", None, raise_failure),
            Job("bug", None, raise_bug),
        ],
        after(0.12),
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


async def test_a_job_following_a_shared_load_ends_alone_and_leaves_the_load() -> None:
    loop = asyncio.get_running_loop()
    load: asyncio.Future[int] = loop.create_future()
    cut = follow("cut", load, str, 0.02, after(1.0))  # its own budget ends first
    served = follow("served", load, str, None, after(1.0))
    assert (await cut).failure == "timeout" and not load.done()
    load.set_result(7)
    assert (await served).value == "7"
    failing: asyncio.Future[int] = loop.create_future()
    failure = follow("failure", failing, str, None, after(1.0))
    failing.set_exception(BlockFailure("http_503"))
    assert (await failure).failure == "http_503"
    broken: asyncio.Future[int] = loop.create_future()
    bug = follow("bug", broken, lambda v: v["x"], None, after(1.0))
    broken.set_result(1)  # converting it raises: a bug, reported as an error
    assert ((await bug).failure, (await bug).detail) == ("error", "TypeError")


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

"""The tiered cache: fresh hits, stale-while-revalidate, coalescing, the shared tier."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from engine.clock import ManualClock
from engine.content.cache import (
    LOCAL,
    SHARED,
    UPSTREAM,
    WRITE_DELAY_S,
    Entry,
    LocalCache,
    MemorySharedCache,
    Policy,
    RedisCache,
    TieredCache,
)
from engine.store import connect

POLICY = Policy(ttl_s=60, stale_s=300)


class Loader:
    """Counts loads; each answers the next version, optionally after a gate opens."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self) -> dict:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("upstream down")
        return {"version": self.calls}


async def settle() -> None:
    """Let background tasks and their done-callbacks run."""
    for _ in range(5):
        await asyncio.sleep(0)


def tiered(clock: ManualClock, shared: object = None, size: int = 100) -> TieredCache:
    return TieredCache(LocalCache(size), shared, clock=clock)  # type: ignore[arg-type]


async def test_fresh_values_come_from_memory_without_a_load() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock)
    first = await cache.get("k", POLICY, load)
    clock.advance(59)
    second = await cache.get("k", POLICY, load)
    assert (first.via, second.via) == (UPSTREAM, LOCAL)
    assert second.entry.data == {"version": 1} and load.calls == 1


async def test_stale_values_are_served_at_once_and_refreshed_once_in_the_background() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock)
    await cache.get("k", POLICY, load)
    clock.advance(61)
    load.gate = asyncio.Event()
    hits = [await cache.get("k", POLICY, load) for _ in range(5)]
    assert all(h.stale and h.entry.data == {"version": 1} for h in hits)
    await settle()  # the refresh starts
    assert load.calls == 2  # one refresh for five stale reads
    load.gate.set()
    await settle()  # the refresh finishes
    fresh = await cache.get("k", POLICY, load)
    assert not fresh.stale and fresh.entry.data == {"version": 2} and load.calls == 2
    clock.advance(60 + 301)  # past ttl + stale: a miss, loaded while the caller waits
    load.gate = None
    late = await cache.get("k", POLICY, load)
    assert late.via == UPSTREAM and late.entry.data == {"version": 3}


async def test_a_burst_of_misses_for_one_key_shares_one_load() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock)
    load.gate = asyncio.Event()
    waiting = [asyncio.ensure_future(cache.get("k", POLICY, load)) for _ in range(50)]
    await asyncio.sleep(0)
    load.gate.set()
    hits = await asyncio.gather(*waiting)
    assert load.calls == 1 and {h.entry.data["version"] for h in hits} == {1}
    assert cache.stats["coalesced"] == 49
    assert (await cache.get("other", POLICY, load)).entry.data == {"version": 2}


async def test_a_caller_that_gives_up_does_not_cancel_the_load_for_the_others() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock)
    load.gate = asyncio.Event()
    impatient = asyncio.ensure_future(cache.get("k", POLICY, load))
    patient = asyncio.ensure_future(cache.get("k", POLICY, load))
    await asyncio.sleep(0)
    impatient.cancel()
    load.gate.set()
    assert (await patient).entry.data == {"version": 1}
    assert load.calls == 1 and impatient.cancelled()


async def test_failures_reach_every_waiter_and_are_not_cached() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock)
    load.fail = True
    results = await asyncio.gather(
        *(cache.get("k", POLICY, load) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results) and load.calls == 1
    load.fail = False
    assert (await cache.get("k", POLICY, load)).entry.data == {"version": 2}


async def test_a_failed_refresh_keeps_serving_the_stale_value() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock)
    await cache.get("k", POLICY, load)
    clock.advance(100)
    load.fail = True
    assert (await cache.get("k", POLICY, load)).stale
    await settle()
    hit = await cache.get("k", POLICY, load)  # still stale, and another refresh is tried
    await settle()
    assert hit.stale and hit.entry.data == {"version": 1} and load.calls == 3


async def test_another_worker_finds_the_value_in_the_shared_cache() -> None:
    clock, load = ManualClock(), Loader()
    shared = MemorySharedCache(clock)
    one, two = tiered(clock, shared), tiered(clock, shared)
    await one.get("k", POLICY, load)
    await settle()  # the shared write runs in the background
    hit = await two.get("k", POLICY, load)
    assert hit.via == SHARED and hit.entry.data == {"version": 1} and load.calls == 1
    assert (await two.get("k", POLICY, load)).via == LOCAL
    three = tiered(clock, shared)
    shared.fail_next()  # the shared cache is down: a miss, never an error
    assert (await three.get("k", POLICY, load)).via == UPSTREAM


async def test_the_local_cache_is_bounded() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock, size=2)
    for key in ("a", "b", "c"):
        await cache.get(key, POLICY, load)
    assert len(cache.local) == 2 and cache.local.get("a") is None


async def test_no_store_policy_still_coalesces_but_keeps_nothing() -> None:
    clock, load = ManualClock(), Loader()
    cache = tiered(clock)
    policy = Policy(ttl_s=0, stale_s=0, store=False)
    await cache.get("k", policy, load)
    await cache.get("k", policy, load)
    assert load.calls == 2 and len(cache.local) == 0


async def test_redis_cache_round_trip_and_one_pipeline_per_tick(redis_url: str) -> None:
    client = connect(redis_url, socket_timeout=None)  # as ContentService opens it
    shared = RedisCache(client, timeout_s=0.5)
    try:
        await shared.set("offers:k", Entry({"a": [1, "x"]}, 1_800_000_000.5), keep_s=60)
        assert await shared.get("offers:k") == Entry({"a": [1, "x"]}, 1_800_000_000.5)
        assert await shared.get("offers:missing") is None
        before = shared.round_trips
        found = await asyncio.gather(*(shared.get(k) for k in ["offers:k", "x", "offers:k"] * 10))
        assert shared.round_trips == before + 1 and found[0] == found[2] and found[1] is None
        ttl = redis.Redis.from_url(redis_url).pttl("nudge:content:offers:k")
        assert 59_000 < ttl <= 60_000
    finally:
        await client.aclose()


@pytest.mark.timeout(10)
async def test_redis_cache_down_reads_as_a_miss() -> None:
    client = connect("redis://127.0.0.1:1/0", socket_timeout=None)  # nothing listens there
    shared = RedisCache(client, timeout_s=0.2)
    try:
        assert await shared.get("k") is None
        await shared.set("k", Entry(1, 0.0), keep_s=5)
        await shared.aclose()
        assert shared.errors == 2
    finally:
        await client.aclose()


@pytest.mark.timeout(10)
async def test_redis_cache_too_slow_reads_as_a_miss_in_time() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the commands, answers nothing

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # No socket timeout, as ContentService opens it: the round trip's own timeout ends it.
    client = connect(f"redis://127.0.0.1:{port}/0", socket_timeout=None)
    shared = RedisCache(client, timeout_s=0.2)  # its round trip gives up only after 1 s
    try:
        started = time.monotonic()
        found = await asyncio.gather(shared.get("a"), shared.get("b"), shared.get("a"))
        assert found == [None, None, None] and shared.errors == 3
        assert time.monotonic() - started < 0.8  # the reads' own timer, not the round trip's
        await shared.aclose()  # waits up to 1 s for the round trip, which gives up by then
        assert shared.errors == 4 and time.monotonic() - started < 1.5
    finally:
        await shared.aclose()
        await client.aclose()
        server.close()


async def test_redis_cache_writes_go_with_the_next_read_or_shortly_after(redis_url: str) -> None:
    client = connect(redis_url, socket_timeout=None)  # as ContentService opens it
    shared = RedisCache(client, timeout_s=0.5)
    direct = redis.Redis.from_url(redis_url)
    try:
        before = shared.round_trips
        shared.set_later("w:one", Entry(1, 1.0), keep_s=60)
        assert await shared.get("w:other") is None  # the write travels with this read
        assert shared.round_trips == before + 1 and direct.exists("nudge:content:w:one")
        shared.set_later("w:two", Entry(2, 2.0), keep_s=60)  # no read comes: its own trip
        assert not direct.exists("nudge:content:w:two")
        async with asyncio.timeout(5):
            while not direct.exists("nudge:content:w:two"):
                await asyncio.sleep(WRITE_DELAY_S)
        assert shared.round_trips == before + 2
    finally:
        await shared.aclose()
        await client.aclose()
        direct.close()

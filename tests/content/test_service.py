"""One answer at a time, in process: shard and sources replaced by controllable fakes."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from engine.clock import ManualClock
from engine.content import ContentService, content_config_from_mapping
from engine.content.request import from_query
from engine.content.sources import FakeTransport, UpstreamRequest
from engine.errors import NotFound

PROFILE = {
    "id": "ann",
    "traits": {"first_name": "Ann", "tier": "gold"},
    "recent": [[1.0, "Product Viewed", "p1", "Shoes"]],
    "cart": {"p2": {"product_id": "p2", "name": "Hat", "price": 5.0, "quantity": 1}},
    "cart_total": 5.0,
    "orders": 0,
}


def table(**extra: object) -> dict:
    base = {
        "source": [
            {"name": "by_id", "url": "https://up.example/id/{customer_id}", "select": "data",
             "html": "<p>{title}</p>", "fallback_html": "<p>hi</p>"},
            {"name": "by_tier", "url": "https://up.example/tier/{traits.tier}", "select": "data",
             "html": "<p>{title}</p>", "timeout_ms": 50},
            {"name": "capped", "url": "https://up.example/hang/{customer_id}", "max_inflight": 2,
             "timeout_ms": 1000},
        ]
    }  # fmt: skip
    base.update(extra)
    return base


class Upstream:
    """Answers by URL path: /hang/ never, /tier/ after `tier_delay` (or once `tier_gate`
    is set, or raising `tier_raises`), else at once."""

    def __init__(self) -> None:
        self.tier_delay = 0.0
        self.tier_gate: asyncio.Event | None = None
        self.tier_raises: BaseException | None = None

    async def __call__(self, request: UpstreamRequest) -> tuple[int, bytes]:
        if "/hang/" in request.url:
            await asyncio.Event().wait()
        if "/tier/" in request.url:
            if self.tier_delay:
                await asyncio.sleep(self.tier_delay)
            if self.tier_gate is not None:
                await self.tier_gate.wait()
            if self.tier_raises is not None:
                raise self.tier_raises
        return 200, orjson.dumps({"data": {"title": request.url.rsplit("/", 1)[1]}})


class Abort(BaseException):
    """Not an Exception: what no block's error handling catches."""


def service(**extra: object) -> tuple[ContentService, FakeTransport, Upstream]:
    upstream = Upstream()
    transport = FakeTransport(upstream)
    config = content_config_from_mapping(table(**extra))
    return ContentService(config, transport=transport, clock=ManualClock()), transport, upstream


async def reader(customer: str) -> dict | None:
    return PROFILE if customer == "ann" else None


def ask(svc: ContentService, customer: str, blocks: str, deadline_ms: int = 200):
    pairs = [("blocks", blocks), ("deadline_ms", str(deadline_ms))]
    return from_query(customer, pairs, svc.config)


async def test_every_block_from_profile_and_sources() -> None:
    svc, transport, _ = service()
    answer = await svc.answer(reader, ask(svc, "ann", "profile,cart,recommendations,by_id,by_tier"))
    by_name = {r.name: r for r in answer.blocks}
    assert [r.name for r in answer.blocks] == [
        "profile",
        "cart",
        "recommendations",
        "by_id",
        "by_tier",
    ]
    assert not answer.fallbacks and answer.profile == "ok"
    assert by_name["by_tier"].html == "<p>gold</p>" and by_name["by_id"].data == {"title": "ann"}
    assert by_name["recommendations"].data["items"][0]["product_id"] == "p1"
    assert sorted(r.url for r in transport.calls) == [
        "https://up.example/id/ann", "https://up.example/tier/gold"]  # fmt: skip


async def test_unknown_customer_is_404_unless_a_generic_fallback_is_configured() -> None:
    svc, _, _ = service()
    with pytest.raises(NotFound):
        await svc.answer(reader, ask(svc, "nobody", "profile,by_id"))
    svc, _, _ = service(unknown_customer="fallback")
    answer = await svc.answer(reader, ask(svc, "nobody", "profile,by_id,by_tier"))
    by_name = {r.name: r for r in answer.blocks}
    assert answer.profile == "unknown_customer"
    assert by_name["profile"].fallback and by_name["by_tier"].reason == "unknown_customer"
    # a source that needs only the id still answers for a customer Nudge has not seen
    assert not by_name["by_id"].fallback and by_name["by_id"].data == {"title": "nobody"}


async def test_a_shard_that_hangs_costs_the_profile_blocks_only() -> None:
    svc, _, _ = service()

    async def hanging(customer: str) -> dict | None:
        await asyncio.Event().wait()
        return None

    started = time.perf_counter()
    answer = await svc.answer(hanging, ask(svc, "ann", "profile,cart,by_id", deadline_ms=80))
    assert time.perf_counter() - started < 0.08 + 0.03
    by_name = {r.name: r for r in answer.blocks}
    assert by_name["cart"].reason == by_name["profile"].reason == "profile_timeout"
    assert not by_name["by_id"].fallback  # started before the profile read, unaffected

    async def broken(customer: str) -> dict | None:
        raise ConnectionError("shard gone")

    answer = await svc.answer(broken, ask(svc, "ann", "profile"))
    assert answer.blocks[0].reason == "profile_unavailable"


async def test_a_slow_source_is_cut_at_its_own_budget() -> None:
    svc, _, upstream = service()
    upstream.tier_delay = 0.1  # the source's own budget is 50 ms
    started = time.perf_counter()
    answer = await svc.answer(reader, ask(svc, "ann", "cart,by_tier"))
    assert time.perf_counter() - started < 0.05 + 0.03
    assert [(r.name, r.reason) for r in answer.blocks] == [("cart", None), ("by_tier", "timeout")]
    assert answer.blocks[1].html == ""  # no fallback_html configured for it


async def test_a_block_cut_by_the_deadline_leaves_the_shared_load_running() -> None:
    svc, transport, upstream = service()
    upstream.tier_gate = gate = asyncio.Event()  # the upstream answers when the test says
    answer = await svc.answer(reader, ask(svc, "ann", "by_tier", deadline_ms=20))
    assert answer.blocks[0].reason == "timeout"
    # The load goes on: the next request waits for the same upstream call, not a new one.
    second = asyncio.ensure_future(svc.answer(reader, ask(svc, "ann", "by_tier", deadline_ms=200)))
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    answer = await second
    assert (answer.blocks[0].source, answer.blocks[0].data) == ("upstream", {"title": "gold"})
    assert len(transport.calls) == 1 and svc.cache.stats["coalesced"] == 1
    answer = await svc.answer(reader, ask(svc, "ann", "by_tier", deadline_ms=20))
    assert (answer.blocks[0].source, answer.blocks[0].fallback) == ("cache", False)
    assert len(transport.calls) == 1


async def test_a_block_ending_in_a_base_exception_is_an_error_not_a_lost_answer() -> None:
    svc, _, upstream = service()
    upstream.tier_raises = Abort()
    answer = await asyncio.wait_for(svc.answer(reader, ask(svc, "ann", "cart,by_tier")), 2)
    assert [(r.name, r.reason) for r in answer.blocks] == [("cart", None), ("by_tier", "error")]
    assert not svc._answering  # nothing left behind for later requests to join


async def test_a_loop_running_late_makes_the_fan_out_end_earlier() -> None:
    svc, _, _ = service()

    async def anyone(customer: str) -> dict:
        return {"id": customer}

    svc.lag.record(0.03)  # timers have lately been running 30 ms late
    started = time.perf_counter()
    answer = await svc.answer(anyone, ask(svc, "x", "capped", deadline_ms=200))
    elapsed = time.perf_counter() - started
    assert answer.blocks[0].reason == "timeout"
    # Twice the lag kept back: the timer fires late, and the caller resumes after it.
    assert 0.2 - 2 * 0.03 - 0.003 - 0.01 < elapsed < 0.2 - 2 * 0.03 + 0.02
    svc.lag.record(0.09)  # never more than half the deadline kept back
    started = time.perf_counter()
    await svc.answer(anyone, ask(svc, "y", "capped", deadline_ms=200))
    assert 0.1 - 0.01 < time.perf_counter() - started < 0.1 + 0.02


async def test_bulkhead_a_hanging_source_holds_at_most_max_inflight_calls() -> None:
    svc, transport, _ = service()

    async def anyone(customer: str) -> dict:
        return {"id": customer}

    answers = await asyncio.gather(
        *(svc.answer(anyone, ask(svc, f"id-{i}", "capped", deadline_ms=50)) for i in range(5))
    )
    reasons = sorted(a.blocks[0].reason for a in answers)
    assert reasons == ["overloaded", "overloaded", "overloaded", "timeout", "timeout"]
    assert len(transport.calls) == 2


async def test_a_recommender_that_fails_or_does_io_costs_its_block_only() -> None:
    class Broken:
        def recommend(self, profile: dict, *, limit: int) -> list[dict]:
            raise ValueError("model missing")

    class Slow:
        async def recommend(self, profile: dict, *, limit: int) -> list[dict]:
            await asyncio.sleep(1)
            return []

    svc, _, _ = service(blocks={"recommendations": {"timeout_ms": 30, "on_failure": "omit"}})
    for recommender, failure in ((Broken(), "error"), (Slow(), "timeout")):
        svc.recommender = recommender
        started = time.perf_counter()
        answer = await svc.answer(reader, ask(svc, "ann", "cart,recommendations"))
        assert time.perf_counter() - started < 0.03 + 0.03
        assert [r.name for r in answer.blocks] == ["cart"]
        assert answer.omitted == ["recommendations"] and svc.stats[f"fallback:{failure}"] == 1


async def test_a_busy_loop_delays_the_answer_by_one_iteration_not_several() -> None:
    # Five tasks each holding the loop 6 ms per step: every iteration lasts ~30 ms.
    # The deadline's timer runs up to two iterations late (due during one, it runs
    # after the spinners queued in the next); the caller must resume in the very next
    # iteration after that. Each further hop would cost another ~30 ms (the old
    # gather-then-task-then-shield path took about 360 ms here).
    # Counted in spinner steps, not milliseconds, so a busy machine that stretches
    # every iteration (or stops the process a while) does not change the count.
    svc, _, _ = service()
    spinning = True
    steps: list[float] = []  # when each spinner step began

    async def anyone(customer: str) -> dict:
        return {"id": customer}

    async def busy() -> None:
        while spinning:
            steps.append(time.perf_counter())
            until = time.perf_counter() + 0.006
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    spinners = [asyncio.create_task(busy()) for _ in range(5)]
    try:
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        answer = await svc.answer(anyone, ask(svc, "x", "capped", deadline_ms=200))
        finished = time.perf_counter()
    finally:
        spinning = False
        await asyncio.gather(*spinners)
    assert answer.blocks[0].reason == "timeout"
    late = sum(1 for t in steps if started + 0.2 < t < finished)
    assert late <= 3 * len(spinners)  # at most three iterations past the deadline


async def test_a_caller_that_leaves_does_not_cancel_the_answer_it_shared() -> None:
    svc, _, upstream = service()
    upstream.tier_delay = 0.02
    first = asyncio.ensure_future(svc.answer(reader, ask(svc, "ann", "cart,by_tier")))
    second = asyncio.ensure_future(svc.answer(reader, ask(svc, "ann", "cart,by_tier")))
    await asyncio.sleep(0)
    first.cancel()
    answer = await second
    assert [(r.name, r.fallback) for r in answer.blocks] == [("cart", False), ("by_tier", False)]
    assert svc.stats["answers_shared"] == 1 and first.cancelled()


async def test_a_cached_source_value_is_rendered_once_not_per_hit() -> None:
    svc, transport, _ = service()
    renders = []
    renderer = svc._renderers["by_id"]
    original = renderer.render

    def counting(data: object) -> str:
        renders.append(data)
        return original(data)

    renderer.render = counting  # type: ignore[method-assign]
    for _ in range(3):
        answer = await svc.answer(reader, ask(svc, "ann", "by_id"))
        assert answer.blocks[0].html == "<p>ann</p>"
    assert len(transport.calls) == 1 and renders == [{"title": "ann"}]


async def test_a_source_that_swallows_cancellation_is_still_cut_at_the_deadline() -> None:
    async def stubborn(request: UpstreamRequest) -> tuple[int, bytes]:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:  # ignores its cancellation (a buggy client)
            await asyncio.sleep(0.3)
        return 200, b"{}"

    config = content_config_from_mapping(table())
    svc = ContentService(config, transport=FakeTransport(stubborn), clock=ManualClock())
    started = time.perf_counter()
    answer = await svc.answer(reader, ask(svc, "ann", "cart,capped", deadline_ms=50))
    assert time.perf_counter() - started < 0.05 + 0.03  # not awaited past the deadline
    assert [(r.name, r.reason) for r in answer.blocks] == [("cart", None), ("capped", "timeout")]

"""A dispatcher under faults between the ESP call and its record: Redis errors, slow
sends at restart, consent changing while a send waits, concurrent DLQ replays.
Real DispatcherActors in process, a real Redis, real SMTP and webhook servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from actors.dispatcher import DispatcherActor
from engine.config import Config
from engine.delivery.config import EspConfig
from engine.delivery.ledger import GROUP, Ledger, dlq_key, record_key
from engine.errors import NotFound
from engine.routing import shard_for
from engine.store import consent_key, outbox_key
from tests.conftest import poll_until, test_config
from tests.delivery.conftest import delivery_config, put_send
from tests.delivery.servers import Hook, smtp_server


@contextlib.contextmanager
def smtp(*script: str) -> Iterator[tuple[EspConfig, object]]:
    with smtp_server(script=script) as (port, inbox):
        yield EspConfig(name="default", kind="smtp", host="127.0.0.1", port=port), inbox


async def live(customer: str) -> dict:
    return {"id": customer, "traits": {"email": f"{customer}@example.com"}, "consent": {}}


def config(esp: EspConfig, **delivery: object) -> Config:
    return dataclasses.replace(test_config(), delivery=delivery_config(esp, **delivery))


async def started(index: int, cfg: Config, redis_url: str, **options: object) -> DispatcherActor:
    dispatcher = DispatcherActor(index, cfg, redis_url, profiles=live, autostart=False, **options)
    await dispatcher.start()
    await poll_until(lambda: dispatcher.ready)
    return dispatcher


def record(r: redis.Redis, customer: str, send_id: str) -> dict | None:
    raw = r.get(record_key(shard_for(customer, 4), send_id))
    return orjson.loads(raw) if raw else None


def first_finish_fails(monkeypatch: pytest.MonkeyPatch, *, after_writing: bool) -> list[int]:
    """Ledger.finish's first call raises a connection reset, before or after it wrote
    (a lost reply); the list it returns numbers the calls made."""
    real_finish = Ledger.finish
    calls: list[int] = []

    async def finish(self: Ledger, *args: object, **kwargs: object) -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 1 and not after_writing:
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        await real_finish(self, *args, **kwargs)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(Ledger, "finish", finish)
    return calls


async def test_a_redis_error_after_the_esp_took_a_send_records_it_without_sending_again(
    redis_url: str, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outcome's record failed on a connection reset: the whole delivery used to run
    # again, and the SMTP server got the email twice, with no crash anywhere.
    calls = first_finish_fails(monkeypatch, after_writing=False)
    with smtp() as (esp, inbox):
        dispatcher = await started(0, config(esp), redis_url)
        try:
            put_send(sync_redis, "ann", "send-ann", "default")
            assert await poll_until(
                lambda: (record(sync_redis, "ann", "send-ann") or {}).get("state") == "sent"
            )
        finally:
            await dispatcher.stop()
    assert calls == [1, 2] and inbox.send_ids == ["send-ann"]
    assert sync_redis.xpending(outbox_key(shard_for("ann", 4)), GROUP)["pending"] == 0


async def test_a_record_whose_reply_was_lost_is_not_counted_twice(
    redis_url: str, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The record was written but its reply lost: writing it again counted the send twice.
    calls = first_finish_fails(monkeypatch, after_writing=True)
    with smtp() as (esp, inbox):
        dispatcher = await started(0, config(esp), redis_url)
        try:
            put_send(sync_redis, "ann", "send-ann", "default")
            stream = outbox_key(shard_for("ann", 4))
            assert await poll_until(
                lambda: calls and sync_redis.xpending(stream, GROUP)["pending"] == 0
            )
            counts = await dispatcher._ledger.counts()
        finally:
            await dispatcher.stop()
    assert calls == [1] and inbox.send_ids == ["send-ann"]
    assert [row["sent"] for row in counts] == [1]
    assert dispatcher.stats["sent"] == 1  # and its own figures count it too


async def test_a_restarted_dispatcher_keeps_its_slow_pending_sends_from_being_claimed(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # Resuming, it waited for a free slot without touching what it held; a send in a
    # long backoff let another dispatcher claim the rest, and both sent them.
    shard = shard_for("bo", 4)
    with smtp("451 4.3.0 try later", "451 4.3.0 try later") as (esp, inbox):
        cfg = config(
            esp, claim_idle_ms=300, max_inflight=1, backoff_initial_ms=1500, backoff_max_ms=1500
        )
        sync_redis.xgroup_create(outbox_key(shard), GROUP, id="0", mkstream=True)
        put_send(sync_redis, "bo", "send-bo-1", "default")
        put_send(sync_redis, "bo", "send-bo-2", "default")
        # dispatcher-0 read both, then its process died (kill -9)
        sync_redis.xreadgroup(GROUP, "dispatcher-0", {outbox_key(shard): ">"})
        other = await started(1, cfg, redis_url, rand=lambda: 1.0)
        restarted = await started(0, cfg, redis_url, rand=lambda: 1.0)
        try:
            assert await poll_until(lambda: len(inbox.send_ids) >= 2, timeout=15)
            # and nothing more once every entry is done
            assert await poll_until(
                lambda: sync_redis.xpending(outbox_key(shard), GROUP)["pending"] == 0, timeout=15
            )
        finally:
            await restarted.stop()
            await other.stop()
    assert sorted(inbox.send_ids) == ["send-bo-1", "send-bo-2"]


async def test_a_dispatcher_with_every_slot_held_keeps_touching_what_it_holds(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # With every slot full the loop only waited, never touching: a send in a long
    # backoff looked abandoned, another dispatcher claimed it, and both could send.
    with smtp("451 4.3.0 try later") as (esp, inbox):
        cfg = config(esp, claim_idle_ms=600, max_inflight=1, backoff_initial_ms=2000,
                     backoff_max_ms=2000)  # fmt: skip
        holder = await started(0, cfg, redis_url, rand=lambda: 1.0)
        other = None
        try:
            put_send(sync_redis, "cy", "send-cy", "default")
            assert await poll_until(lambda: holder.stats["failed"] == 1)  # the 451: backing off
            other = await started(1, cfg, redis_url, rand=lambda: 1.0)
            assert await poll_until(lambda: inbox.send_ids == ["send-cy"], timeout=15)
            assert await poll_until(lambda: holder.stats["sent"] == 1)
        finally:
            if other is not None:
                await other.stop()
            await holder.stop()
    assert other.stats["sent"] == 0


async def test_touch_leaves_an_entry_another_dispatcher_has_claimed(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # Touch was an XCLAIM of every id: it took back an entry a second dispatcher had
    # claimed (this one having looked stalled), and the two passed it back and forth.
    shard = shard_for("dee", 4)
    sync_redis.xgroup_create(outbox_key(shard), GROUP, id="0", mkstream=True)
    sid = put_send(sync_redis, "dee", "send-dee", "hook").decode()
    sync_redis.xreadgroup(GROUP, "dispatcher-0", {outbox_key(shard): ">"})
    sync_redis.xclaim(outbox_key(shard), GROUP, "dispatcher-1", 0, [sid])
    ledger = Ledger(aioredis.Redis.from_url(redis_url), 4)
    try:
        await ledger.touch("dispatcher-0", shard, [sid])
        [held] = sync_redis.xpending_range(outbox_key(shard), GROUP, min="-", max="+", count=9)
        assert held["consumer"] == b"dispatcher-1"
        await ledger.touch("dispatcher-1", shard, [sid])  # its holder's touch works
        [held] = sync_redis.xpending_range(outbox_key(shard), GROUP, min="-", max="+", count=9)
        assert held["consumer"] == b"dispatcher-1" and held["times_delivered"] >= 1
    finally:
        await ledger.close()


async def test_a_send_finished_elsewhere_during_a_backoff_is_not_sent_again(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # After its backoff a send went straight to its next attempt: one another
    # dispatcher had claimed and finished meanwhile went out twice.
    with smtp("451 4.3.0 try later") as (esp, inbox):
        cfg = config(esp, backoff_initial_ms=1000, backoff_max_ms=1000)
        dispatcher = await started(0, cfg, redis_url, rand=lambda: 1.0)
        try:
            put_send(sync_redis, "flo", "send-flo", "default")
            assert await poll_until(lambda: dispatcher.stats["failed"] == 1)  # backing off
            finished = {"state": "sent", "attempts": 2, "at": time.time(), "detail": "other"}
            sync_redis.set(
                record_key(shard_for("flo", 4), "send-flo"), orjson.dumps(finished)
            )  # what the other dispatcher's finish left
            assert await poll_until(
                lambda: sync_redis.xpending(outbox_key(shard_for("flo", 4)), GROUP)["pending"] == 0
            )
        finally:
            await dispatcher.stop()
    assert inbox.send_ids == [] and dispatcher.stats["sent"] == 0


async def test_an_unsubscribe_during_the_rate_limit_wait_stops_the_send(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # Consent was checked before the rate limiter's wait, which grows with a backlog.
    hook = Hook(secret="k")
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k", rate_per_s=1)
        dispatcher = await started(0, config(esp, dispatchers=1), redis_url)
        try:
            for n in range(4):
                put_send(sync_redis, "cal", f"send-cal-{n}", "hook")
            assert await poll_until(lambda: len(hook.requests) >= 1)
            # what the API notes with an Unsubscribed event, before answering 2xx
            sync_redis.set(consent_key(shard_for("cal", 4), "cal"), "unsubscribed", ex=3600)
            unsubscribed_at = time.time()
            assert await poll_until(
                lambda: all(
                    (record(sync_redis, "cal", f"send-cal-{n}") or {}).get("state")
                    in ("sent", "suppressed")
                    for n in range(4)
                )
            )
        finally:
            await dispatcher.stop()
    assert len(hook.requests) == 1 and hook.requests[0]["at"] < unsubscribed_at
    states = [record(sync_redis, "cal", f"send-cal-{n}")["state"] for n in range(4)]
    assert sorted(states) == ["sent", "suppressed", "suppressed", "suppressed"]


async def test_a_probe_whose_record_fails_does_not_jam_the_breaker(
    redis_url: str, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The half-open probe's "sending" mark failed: the breaker never learned the
    # ESP's answer and stayed probing, so every later send to a healthy ESP was
    # dead-lettered as "circuit open", the accepted probe among them.
    real_mark = Ledger.mark_sending
    marks = 0

    async def second_fails(self: Ledger, *args: object, **kwargs: object) -> None:
        nonlocal marks
        marks += 1
        if marks == 2:  # the probe's, after the first attempt's 500 opened the breaker
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        await real_mark(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "mark_sending", second_fails)
    hook = Hook(secret="k", script=[(500, {})])
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        cfg = config(
            esp, breaker_failures=1, breaker_reset_s=0.3, max_attempts=4,
            backoff_initial_ms=10, backoff_max_ms=20,
        )  # fmt: skip
        dispatcher = await started(0, cfg, redis_url)
        try:
            put_send(sync_redis, "eli", "send-eli-1", "hook")
            assert await poll_until(
                lambda: (record(sync_redis, "eli", "send-eli-1") or {}).get("state") == "sent"
            )
            put_send(sync_redis, "eli", "send-eli-2", "hook")
            assert await poll_until(
                lambda: (record(sync_redis, "eli", "send-eli-2") or {}).get("state") == "sent"
            )
            assert dispatcher.breakers["hook"].state(time.monotonic()) == "closed"
        finally:
            await dispatcher.stop()
    assert marks >= 2 and sorted(hook.accepted) == ["send-eli-1", "send-eli-2"]
    assert sync_redis.xlen(dlq_key(shard_for("eli", 4))) == 0


async def test_two_replays_of_one_dead_letter_put_it_back_once(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # B read the letter, A replayed it whole, then B's transaction ran: two outbox
    # entries for one send, both delivered.
    shard = shard_for("dot", 4)
    sync_redis.xgroup_create(outbox_key(shard), GROUP, id="0", mkstream=True)
    sid = put_send(sync_redis, "dot", "send-dot", "hook").decode()
    first, second = Ledger(aioredis.Redis.from_url(redis_url), 4), None
    try:
        send = {"send_id": "send-dot", "customer": "dot", "rule": "manual", "esp": "hook"}
        letter = await first.dead_letter(shard, sid, send, error="x", attempts=6, now=time.time())
        second = Ledger(aioredis.Redis.from_url(redis_url), 4)
        read_letter = second.dead_letter_get

        async def read_then_lose_the_race(letter_id: str) -> dict:
            found = await read_letter(letter_id)
            await first.replay(letter)  # the other replay lands in between
            return found

        second.dead_letter_get = read_then_lose_the_race
        with pytest.raises(NotFound):
            await second.replay(letter)
    finally:
        await first.close()
        if second is not None:
            await second.close()
    assert [orjson.loads(f[b"s"])["send_id"] for _, f in sync_redis.xrange(outbox_key(shard))] == [
        "send-dot"
    ]
    assert sync_redis.xlen(dlq_key(shard)) == 0


async def test_replaying_every_letter_passes_over_one_replayed_meanwhile(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    from engine.delivery.routes import replay

    shard = shard_for("eve", 4)
    sync_redis.xgroup_create(outbox_key(shard), GROUP, id="0", mkstream=True)
    ledger = Ledger(aioredis.Redis.from_url(redis_url), 4)
    try:
        letters = []
        for n in range(3):
            sid = put_send(sync_redis, "eve", f"send-eve-{n}", "hook").decode()
            send = {"send_id": f"send-eve-{n}", "customer": "eve", "rule": "manual"}
            letters.append(
                await ledger.dead_letter(shard, sid, send, error="x", attempts=6, now=time.time())
            )
        real_replay = ledger.replay

        async def someone_else_was_first(letter_id: str) -> str:
            if letter_id == letters[1]:
                await real_replay(letter_id)
            return await real_replay(letter_id)

        ledger.replay = someone_else_was_first
        done = await replay(ledger, None)
        assert [d["id"] for d in done] == [letters[0], letters[2]]
        with pytest.raises(NotFound):  # named, it is an error
            await replay(ledger, [letters[1]])
    finally:
        await ledger.close()
    assert sync_redis.xlen(outbox_key(shard)) == 3 and sync_redis.xlen(dlq_key(shard)) == 0


async def test_a_dead_letter_names_the_open_circuit_once(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # Each attempt refused by the open breaker used to wrap the message again:
    # "circuit open (last error: circuit open (last error: ...))".
    hook = Hook(secret="k")
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        cfg = config(esp, breaker_failures=1, breaker_reset_s=0, max_attempts=4)
        dispatcher = await started(0, cfg, redis_url)
        breaker = dispatcher.breakers["hook"]
        breaker.failure(time.monotonic())  # open, its probe taken by another send in flight
        breaker._probing = True
        try:
            put_send(sync_redis, "fi", "send-fi", "hook")
            assert await poll_until(lambda: sync_redis.xlen(dlq_key(shard_for("fi", 4))) == 1)
        finally:
            await dispatcher.stop()
    [(_, fields)] = sync_redis.xrange(dlq_key(shard_for("fi", 4)))
    error = orjson.loads(fields[b"d"])["error"]
    assert hook.requests == []
    assert error == "gave up after 4 attempts: circuit open for ESP 'hook'"


async def test_a_call_that_fails_unexpectedly_leaves_a_final_record_and_anothers_probe(
    redis_url: str, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An adapter bug (not a transient or permanent ESP error): its "sending" mark,
    # left running, landed after the dead letter and left the record not final; and
    # the call, started while the breaker was closed, freed the probe another call
    # held once the breaker had opened meanwhile.
    real_mark = Ledger.mark_sending
    marks_done = []

    async def slow_mark(self: Ledger, *args: object, **kwargs: object) -> None:
        await asyncio.sleep(0.05)
        await real_mark(self, *args, **kwargs)
        marks_done.append(1)

    monkeypatch.setattr(Ledger, "mark_sending", slow_mark)
    monkeypatch.setattr("actors.dispatcher._MAX_SURPRISES", 1)
    with smtp() as (esp, _inbox):
        dispatcher = await started(0, config(esp), redis_url)
        breaker = dispatcher.breakers["default"]

        async def adapter_bug(email: object) -> str:
            breaker.opened_at = time.monotonic() - breaker.reset_s  # others failed: half-open
            assert breaker.allow(time.monotonic())  # ...and another call took the probe
            raise RuntimeError("adapter bug")

        dispatcher.adapters["default"].send = adapter_bug
        try:
            put_send(sync_redis, "ann", "send-ann", "default")
            assert await poll_until(lambda: dispatcher.stats["dead_lettered"] == 1)
            assert await poll_until(lambda: marks_done)  # the slow mark has landed
        finally:
            await dispatcher.stop()
    assert record(sync_redis, "ann", "send-ann")["state"] == "dead"
    assert breaker._probing  # still the other call's


async def test_attempts_the_open_breaker_refuses_take_no_token(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # Each refused attempt spent a rate-limit token, so the calls after the breaker
    # closed again queued behind attempts that never went out.
    with smtp() as (esp, inbox):
        esp = dataclasses.replace(esp, rate_per_s=0.01)  # a burst of one, then one per 100 s
        dispatcher = await started(0, config(esp, breaker_reset_s=3600.0), redis_url)
        try:
            breaker, bucket = dispatcher.breakers["default"], dispatcher.buckets["default"]
            breaker.opened_at = time.monotonic()  # open, as after failures in a row
            put_send(sync_redis, "ann", "send-ann", "default")
            assert await poll_until(lambda: dispatcher.stats["failed"] >= 1)
            assert bucket.tokens == pytest.approx(1.0, abs=0.01)  # still there for the next
            assert inbox.send_ids == []
        finally:
            await dispatcher.stop()

"""Trigger rules inside the running engine: API -> stream -> shard -> rules -> outbox."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime

import httpx
import orjson
import pytest
import redis

from engine.api import create_app
from engine.clock import ManualClock
from engine.config import load
from engine.routing import shard_for
from engine.store import outbox_key
from tests.conftest import ROOT, LocalShards, serve_app, test_config

WRITE = ("dev-write-key", "")
ADMIN = {"Authorization": "Bearer dev-admin-key"}
# A weekday morning in UTC, outside the starter rules' quiet hours (21:00-08:00).
MORNING = datetime(2026, 11, 18, 10, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def live(redis_url: str):
    rules = load(ROOT / "config.toml", env={}).rules
    config = dataclasses.replace(test_config(), rules=rules)
    clock = ManualClock(MORNING)
    shards = LocalShards(config, redis_url, clock)
    with (
        serve_app(create_app(config, redis_url, shards.connect)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        yield client, clock, config


def outbox(r: redis.Redis, customer: str, shards: int = 4) -> list[dict]:
    entries = r.xrange(outbox_key(shard_for(customer, shards)))
    return [s for s in (orjson.loads(f[b"s"]) for _, f in entries) if s["customer"] == customer]


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def at(seconds: float) -> str:
    return datetime.fromtimestamp(MORNING + seconds, UTC).isoformat()


def add_to_cart(client: httpx.Client, customer: str, when: float) -> None:
    msg = {
        "userId": customer,
        "event": "Product Added",
        "timestamp": at(when),
        "properties": {"product_id": "sku-1", "name": "Wool socks", "price": 9.5},
    }
    assert client.post("/v1/track", auth=WRITE, json=msg).status_code == 200


def test_cart_abandonment_reaches_the_outbox_once(live, sync_redis: redis.Redis) -> None:
    client, clock, _ = live
    identify = {"userId": "ann", "traits": {"first_name": "Ann"}, "timestamp": at(-60)}
    assert client.post("/v1/identify", auth=WRITE, json=identify).status_code == 200
    add_to_cart(client, "ann", 0)
    explained = client.get("/v1/profiles/ann/explain", headers=ADMIN).json()
    cart = next(r for r in explained["rules"] if r["rule"] == "cart_abandonment")
    assert cart["status"] == "waiting", cart
    assert outbox(sync_redis, "ann") == []

    clock.advance(14 * 60)
    time.sleep(0.1)  # the shard loop runs every few ms: 14 minutes is not enough
    assert outbox(sync_redis, "ann") == []
    clock.advance(2 * 60)
    sends = wait_for(lambda: outbox(sync_redis, "ann"))
    assert len(sends) == 1
    send = sends[0]
    assert send["rule"] == "cart_abandonment" and send["step"] == 1
    assert send["at"] == pytest.approx(MORNING + 15 * 60)
    assert send["payload"]["first_name"] == "Ann"
    assert send["payload"]["items"]["sku-1"]["name"] == "Wool socks"
    time.sleep(0.1)
    assert len(outbox(sync_redis, "ann")) == 1  # and only once


def test_an_order_inside_the_window_means_no_email(live, sync_redis: redis.Redis) -> None:
    client, clock, _ = live
    add_to_cart(client, "bob", 0)
    order = {
        "userId": "bob",
        "event": "Order Completed",
        "timestamp": at(5 * 60),
        "properties": {"order_id": "o1", "revenue": 9.5},
    }
    assert client.post("/v1/track", auth=WRITE, json=order).status_code == 200
    client.get("/v1/profiles/bob", headers=ADMIN)  # applied
    clock.advance(48 * 3600)
    time.sleep(0.2)
    assert [s["rule"] for s in outbox(sync_redis, "bob")] == []


def test_unsubscribed_customers_get_nothing(live, sync_redis: redis.Redis) -> None:
    client, clock, _ = live
    add_to_cart(client, "cy", 0)
    unsub = {"userId": "cy", "event": "Unsubscribed", "timestamp": at(60)}
    assert client.post("/v1/track", auth=WRITE, json=unsub).status_code == 200
    client.get("/v1/profiles/cy", headers=ADMIN)
    clock.advance(48 * 3600)
    time.sleep(0.2)
    assert outbox(sync_redis, "cy") == []


async def test_a_timer_due_while_down_fires_on_recovery(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    from actors.shard import ShardActor
    from engine.events import normalize
    from engine.store import Store, connect

    rules = load(ROOT / "config.toml", env={}).rules
    config = test_config(shards=1)
    clock = ManualClock(MORNING)

    async def started() -> ShardActor:
        actor = ShardActor(
            0, 1, config.engine, redis_url, rules=rules, clock=clock, autostart=False
        )
        await actor.start()
        while not actor.ready:
            await asyncio.sleep(0.005)
        return actor

    actor = await started()
    store = Store(connect(redis_url), 1)
    msg = {
        "userId": "dee",
        "event": "Product Added",
        "timestamp": at(0),
        "properties": {"product_id": "p"},
    }
    written = await store.append([normalize(msg, kind="track", received_at=MORNING)])
    assert await actor.wait_applied(written[0])
    await actor.stop()  # the timer is in the checkpoint, nothing sent yet
    assert outbox(sync_redis, "dee", shards=1) == []

    clock.advance(60 * 60)  # the engine was down when the 15 minutes passed
    revived = await started()
    for _ in range(500):
        if outbox(sync_redis, "dee", shards=1):
            break
        await asyncio.sleep(0.01)
    [send] = outbox(sync_redis, "dee", shards=1)
    assert send["rule"] == "cart_abandonment" and send["at"] == pytest.approx(MORNING + 60 * 60)
    await revived.stop()
    await store.close()


async def test_sends_leave_before_the_checkpoint_and_a_replay_does_not_repeat_them(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    from actors.shard import ShardActor
    from engine.events import normalize
    from engine.store import Store, connect

    rules = load(ROOT / "config.toml", env={}).rules
    config = test_config(shards=1, checkpoint_interval_ms=3_600_000, checkpoint_events=10**9)
    clock = ManualClock(MORNING)

    async def started() -> ShardActor:
        actor = ShardActor(
            0, 1, config.engine, redis_url, rules=rules, clock=clock, autostart=False
        )
        await actor.start()
        while not actor.ready:
            await asyncio.sleep(0.005)
        return actor

    actor = await started()
    store = Store(connect(redis_url), 1)
    msg = {"userId": "eve", "event": "Product Added", "properties": {"product_id": "p"}}
    written = await store.append([normalize(msg, kind="track", received_at=MORNING)])
    assert await actor.wait_applied(written[0])
    clock.advance(16 * 60)
    sends = []
    for _ in range(500):
        if sends := outbox(sync_redis, "eve", shards=1):
            break
        await asyncio.sleep(0.01)
    assert [s["rule"] for s in sends] == ["cart_abandonment"]
    assert actor.checkpoints == 0  # out before any checkpoint

    # A crash: the loop ends with no final checkpoint, so a new shard replays the event.
    actor._stopping = True
    await actor._task
    await actor._store.close()
    revived = await started()
    # The replay decides the send again: its id is marked as out, so no second entry.
    assert await revived.wait_applied(written[0])
    revived._tick()
    assert revived.partition.sent >= 1  # decided again...
    await revived._flush_sends()
    assert outbox(sync_redis, "eve", shards=1) == sends  # ...and written once
    await revived.stop()
    await store.close()

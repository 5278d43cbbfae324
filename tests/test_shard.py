"""The shard's loop on a real Redis, driven directly (no Ray): apply, checkpoint, recover."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import pytest
import redis

from actors.shard import ShardActor
from engine.config import EngineConfig
from engine.routing import shard_for
from engine.store import Store, connect
from tests.conftest import poll_until
from tests.factories import normalized, track
from tests.faults import transactions_fail

SHARDS = 1
T0 = 1_700_000_000.0


def settings(**overrides: object) -> EngineConfig:
    return dataclasses.replace(EngineConfig(shards=SHARDS, checkpoint_interval_ms=20), **overrides)


async def started(redis_url: str, config: EngineConfig) -> ShardActor:
    actor = ShardActor(0, SHARDS, config, redis_url, autostart=False)
    await actor.start()
    for _ in range(500):
        if actor.ready:
            return actor
        await asyncio.sleep(0.01)
    raise AssertionError("shard did not become ready")


async def crash(actor: ShardActor) -> None:
    """Abandon the shard without a final checkpoint: what Redis holds is all that survives."""
    actor._stopping = True  # the loop leaves at its next turn; only stop() checkpoints
    await actor._task
    if actor._checkpointing is not None:  # one being written dies with the process
        actor._checkpointing.cancel()
        with contextlib.suppress(BaseException):
            await actor._checkpointing
    await actor._store.close()


@pytest.fixture
async def store(redis_url: str):
    store = Store(connect(redis_url), SHARDS)
    yield store
    await store.close()


async def append_events(
    store: Store, customers: list[str], per_customer: int, per_entry: int = 10
) -> str:
    events = [
        normalized(track(c, "Product Viewed", product_id=str(n)))
        for n in range(per_customer)
        for c in customers
    ]
    last = ""
    for start in range(0, len(events), per_entry):
        last = (await store.append(events[start : start + per_entry]))[0]
    return last


async def test_applies_stream_and_checkpoints(redis_url: str, store: Store) -> None:
    actor = await started(redis_url, settings())
    last = await append_events(store, ["ann", "bob"], 5)
    assert await actor.wait_applied(last, timeout=5)
    [ann, bob, nobody] = await actor.get_profiles(["ann", "bob", "nobody"])
    assert ann["counts"] == {"Product Viewed": 5} and bob["counts"] == {"Product Viewed": 5}
    assert nobody is None
    assert await actor.checkpoint_now() == last
    pos, profiles, _, _ = await store.load_checkpoint(0)
    assert pos == last and set(profiles) == {b"ann", b"bob"}
    await actor.stop()


async def test_cpu_is_counted_by_activity_within_the_process(redis_url: str, store: Store) -> None:
    actor = await started(redis_url, settings())
    before = (await actor.status())["cpu_s"]
    last = await append_events(store, [f"c{n}" for n in range(50)], 20)
    assert await actor.wait_applied(last, timeout=5)
    await actor.checkpoint_now()
    after = (await actor.status())["cpu_s"]
    assert after["apply"] > before["apply"] and after["decode"] > before["decode"]
    assert after["checkpoint_encode"] > before["checkpoint_encode"]
    parts = sum(v for k, v in after.items() if k != "process")
    assert 0 < parts <= after["process"]  # the loop thread's parts of the process's CPU
    metrics = {m["name"]: m for m in await actor.metrics()}
    samples = metrics["nudge_shard_cpu_seconds_total"]["samples"]
    assert samples[("0", "apply")] >= after["apply"] and ("0", "process") in samples
    await actor.stop()


async def test_crash_mid_stream_applies_every_event_exactly_once(
    redis_url: str, store: Store
) -> None:
    # 400 events per customer: far more than the 100 messageIds dedupe remembers,
    # so only a correct checkpoint position can prevent double counting.
    config = settings(checkpoint_interval_ms=60_000, checkpoint_events=130, read_count=7)
    actor = await started(redis_url, config)
    customers = ["c0", "c1", "c2"]
    last = await append_events(store, customers, 400)
    assert await actor.wait_applied(last, timeout=10)
    assert (
        actor.checkpoints >= 1 and actor.checkpoint_pos != actor.pos
    )  # progress past the checkpoint
    await crash(actor)

    revived = await started(redis_url, config)
    assert await revived.wait_applied(last, timeout=10)
    profiles = await revived.get_profiles(customers)
    assert [p["counts"]["Product Viewed"] for p in profiles] == [400, 400, 400]
    assert revived.partition.stats["applied"] < 1200  # it replayed only the tail
    await revived.stop()


async def test_stop_and_start_restores_identical_profiles(redis_url: str, store: Store) -> None:
    actor = await started(redis_url, settings())
    await store.append(
        [normalized(track("ann", "Product Added", product_id="p1", price=3.5, quantity=2))]
    )
    last = await append_events(store, ["ann"], 3)
    await actor.wait_applied(last)
    before = {cid: p.to_dict() for cid, p in actor.partition.profiles.items()}
    await actor.stop()
    again = await started(redis_url, settings())
    after = {cid: p.to_dict() for cid, p in again.partition.profiles.items()}
    assert after == before and after["ann"]["cart"]["p1"]["quantity"] == 2
    await again.stop()


async def test_a_broken_event_does_not_wedge_the_shard(redis_url: str, store: Store) -> None:
    actor = await started(redis_url, settings())
    good = normalized(track("ann"))
    broken = {"event": "written by a buggy producer"}
    await store.append_groups({0: [broken]})
    last = (await store.append_groups({0: [good]}))[0]
    assert await actor.wait_applied(last)
    assert actor.failed_events == 1
    [ann] = await actor.get_profiles(["ann"])
    assert ann["counts"]["Product Viewed"] >= 1
    await actor.stop()


async def test_merge_forward_crosses_shards(redis_url: str) -> None:
    await merge_across_shards(redis_url, dataclasses.replace(settings(), shards=2))


async def test_merge_forward_does_not_wait_for_a_long_checkpoint_interval(redis_url: str) -> None:
    # An hour between checkpoints: only the pending forwards bring one on.
    config = settings(checkpoint_interval_ms=3_600_000, urgent_checkpoint_ms=20, shards=2)
    await merge_across_shards(redis_url, config)


async def test_an_erased_customer_leaves_redis_without_waiting_for_the_interval(
    redis_url: str, store: Store
) -> None:
    config = settings(checkpoint_interval_ms=3_600_000, urgent_checkpoint_ms=20)
    actor = await started(redis_url, config)
    last = await append_events(store, ["ann", "bob"], 2)
    assert await actor.wait_applied(last)
    await actor.checkpoint_now()
    assert set((await store.load_checkpoint(0))[1]) == {b"ann", b"bob"}
    gone = (await store.append([erase("ann")]))[0]
    assert await actor.wait_applied(gone)
    for _ in range(300):
        if set((await store.load_checkpoint(0))[1]) == {b"bob"}:
            break
        await asyncio.sleep(0.01)
    assert set((await store.load_checkpoint(0))[1]) == {b"bob"}
    reasons = actor.meters.checkpoints.values
    assert reasons.get(("0", "asked")) == 1 and reasons.get(("0", "urgent")) == 1
    await actor.stop()


def erase(customer: str) -> dict:
    """What DELETE /v1/profiles/{id} writes to the stream."""
    now = time.time()
    return {
        "type": "_erase",
        "customer": customer,
        "userId": customer,
        "anonymousId": None,
        "messageId": f"erase-{customer}",
        "ts": now,
        "receivedAt": now,
    }


async def merge_across_shards(redis_url: str, config: EngineConfig) -> None:
    """Identify an anonymous visitor of one shard as a user of the other; the merge lands."""
    user = "user-1"
    anon = next(f"anon-{i}" for i in range(100) if shard_for(f"anon-{i}", 2) != shard_for(user, 2))
    actors = [ShardActor(i, 2, config, redis_url, autostart=False) for i in range(2)]
    for actor in actors:
        await actor.start()
    store = Store(connect(redis_url), 2)
    await store.append([normalized(track(anon, "Product Viewed", anonymous=True, product_id="p9"))])
    written = await store.append(
        [
            normalized(
                {"type": "identify", "userId": user, "anonymousId": anon, "traits": {"name": "Ann"}}
            )
        ]
    )
    owner = actors[shard_for(user, 2)]
    await owner.wait_applied(written[shard_for(user, 2)])
    for _ in range(300):  # the merge crosses two checkpoints (20 ms apart at most)
        [profile] = await owner.get_profiles([user])
        if profile["merged_ids"]:
            break
        await asyncio.sleep(0.01)
    assert profile["merged_ids"] == [anon]
    assert profile["counts"] == {"Product Viewed": 1}
    [alias] = await actors[shard_for(anon, 2)].get_profiles([anon])
    assert alias == user
    for actor in actors:
        await actor.stop()
    await store.close()


async def merged_after_a_checkpoint(
    redis_url: str, store: Store, config: EngineConfig
) -> ShardActor:
    """A shard that checkpointed anon-9's and ann's views, then applied their merge."""
    actor = await started(redis_url, config)
    await store.append([normalized(track("anon-9", anonymous=True))])
    last = (await store.append([normalized(track("ann"))]))[0]
    assert await actor.wait_applied(last)
    await actor.checkpoint_now()
    identify = {"type": "identify", "userId": "ann", "anonymousId": "anon-9", "traits": {}}
    last = (await store.append([normalized({**identify, "messageId": "m-identify"})]))[0]
    assert await actor.wait_applied(last)
    return actor


async def test_a_checkpoint_that_dies_at_its_commit_loses_no_identity_merge(
    redis_url: str, store: Store
) -> None:
    # The merged profile, the merged-away one and the alias must reach Redis together:
    # written apart (b0510a7, reverted), the replay after this crash passed over the
    # identify and left anon-9 a profile of its own, its first view counted twice.
    config = settings(checkpoint_interval_ms=600_000, checkpoint_events=10**9)
    actor = await merged_after_a_checkpoint(redis_url, store, config)
    live = actor.partition.profiles["ann"].to_dict()
    assert actor.partition.aliases["anon-9"] == "ann" and live["counts"]["Product Viewed"] == 2

    with transactions_fail(actor._store.redis), pytest.raises(redis.exceptions.ConnectionError):
        await actor.checkpoint_now()
    await crash(actor)

    revived = await started(redis_url, config)
    last = (await store.append([normalized(track("anon-9", anonymous=True))]))[0]
    assert await revived.wait_applied(last)
    ann, anon = await revived.get_profiles(["ann", "anon-9"])
    assert anon == "ann"  # still an alias: its new view went to ann
    assert ann["counts"] == {**live["counts"], "Product Viewed": 3}
    assert ann["merged_ids"] == ["anon-9"]
    await revived.stop()


async def test_an_alias_made_again_while_a_checkpoint_failed_survives_the_retry(
    redis_url: str, store: Store
) -> None:
    # anon-9 lost its alias when ann was erased; the checkpoint carrying that removal
    # failed after anon-9 had been merged into zed. Requeued as removed as well, the
    # retry wrote the alias to zed and then deleted it: after a crash anon-9's events
    # made a second profile instead of going to zed.
    config = settings(
        checkpoint_interval_ms=600_000, checkpoint_events=10**9, urgent_checkpoint_ms=600_000
    )
    actor = await merged_after_a_checkpoint(redis_url, store, config)
    await actor.checkpoint_now()
    erase = {"type": "_erase", "customer": "ann", "userId": "ann", "anonymousId": None,
             "messageId": "erase-ann", "ts": time.time(), "receivedAt": time.time()}  # fmt: skip
    assert await actor.wait_applied((await store.append([erase]))[0])
    assert "anon-9" not in actor.partition.aliases

    identify = {"type": "identify", "userId": "zed", "anonymousId": "anon-9", "traits": {}}
    real_save = actor._store.save_checkpoint

    async def fails_after_a_merge(index: int, changes: object, pos: str) -> None:
        assert changes.unaliased == ["anon-9"]
        last = (await store.append([normalized({**identify, "messageId": "m-zed"})]))[0]
        assert await actor.wait_applied(last)  # applied while the checkpoint is out
        raise redis.exceptions.ConnectionError("lost")

    actor._store.save_checkpoint = fails_after_a_merge
    with pytest.raises(redis.exceptions.ConnectionError):
        await actor.checkpoint_now()
    actor._store.save_checkpoint = real_save
    assert actor.partition.aliases["anon-9"] == "zed"
    await actor.checkpoint_now()
    await crash(actor)

    revived = await started(redis_url, config)
    assert revived.partition.aliases == {"anon-9": "zed"}
    last = (await store.append([normalized(track("anon-9", anonymous=True))]))[0]
    assert await revived.wait_applied(last)
    zed, anon = await revived.get_profiles(["zed", "anon-9"])
    assert anon == "zed" and zed["merged_ids"] == ["anon-9"]
    assert zed["counts"] == {"Product Viewed": 1}  # the view, not a profile of its own
    await revived.stop()


async def test_checkpoints_never_overlap(redis_url: str, store: Store) -> None:
    # An asked-for checkpoint (checkpoint_now, stop) ran beside the loop's own: the
    # loop's unlinked the other's staging key, committed, and the other's commit then
    # set the position back with none of its profiles in: x's events were lost.
    config = settings(
        checkpoint_interval_ms=600_000, checkpoint_events=10**9, urgent_checkpoint_ms=600_000
    )
    actor = await started(redis_url, config)
    assert await actor.wait_applied(await append_events(store, ["x"], 3))
    real_save = actor._store.save_checkpoint
    slow_redis = asyncio.Event()
    flying, most = 0, 0

    async def save(index: int, changes: object, pos: str) -> None:
        nonlocal flying, most
        flying += 1
        most = max(most, flying)
        try:
            await slow_redis.wait()
            await real_save(index, changes, pos)
        finally:
            flying -= 1

    actor._store.save_checkpoint = save
    asked = asyncio.ensure_future(actor.checkpoint_now())  # carries x
    while not flying:
        await asyncio.sleep(0.005)
    actor.settings = dataclasses.replace(config, checkpoint_events=1)  # the loop's is due
    assert await actor.wait_applied(await append_events(store, ["y"], 1))
    # One more event applied: the loop has been past its checkpoint check since y.
    assert await actor.wait_applied(await append_events(store, ["z"], 1))
    slow_redis.set()
    await asked
    await actor.checkpoint_now()  # after the loop's, if it began one
    assert most == 1
    await crash(actor)

    revived = await started(redis_url, config)
    x, y, z = await revived.get_profiles(["x", "y", "z"])
    assert (x["counts"], y["counts"], z["counts"]) == (
        {"Product Viewed": 3},
        {"Product Viewed": 1},
        {"Product Viewed": 1},
    )
    await revived.stop()


async def test_a_checkpoint_that_dies_before_its_fold_is_recovered_whole(
    redis_url: str, store: Store
) -> None:
    # Committed, but never folded into the profiles hash: recovery reads the stage.
    config = settings(checkpoint_interval_ms=600_000, checkpoint_events=10**9)
    actor = await merged_after_a_checkpoint(redis_url, store, config)
    last = await append_events(store, ["ann", "bob"], 3)
    assert await actor.wait_applied(last)
    live = {cid: p.to_dict() for cid, p in actor.partition.profiles.items()}

    async def died(index: int, chunks: list) -> None:
        await crash(actor)  # the process dies right after the commit
        raise ConnectionError("gone")

    actor._store._fold = died
    with contextlib.suppress(Exception):
        await actor.checkpoint_now()

    revived = await started(redis_url, config)
    assert {cid: p.to_dict() for cid, p in revived.partition.profiles.items()} == live
    assert revived.partition.aliases == {"anon-9": "ann"}
    last = (await store.append([normalized(track("anon-9", anonymous=True))]))[0]
    assert await revived.wait_applied(last)
    await revived.checkpoint_now()  # folds the stage left behind before its own commit
    await revived.stop()
    again = await started(redis_url, config)
    assert again.partition.profiles["ann"].counts["Product Viewed"] == 6
    assert set(again.partition.profiles) == {"ann", "bob"}
    await again.stop()


async def test_events_are_enriched_from_the_catalog_at_once_and_again_on_replay(
    redis_url: str, store: Store
) -> None:
    # The catalog came with the first insight flush, seconds after start: the first
    # events of a started shard, and every event replayed after a crash, went
    # without the catalog's category, and the rules saw a different event.
    from engine.recs.catalog import normalize_product
    from engine.recs.store import RecsStore

    recs = RecsStore(connect(redis_url))
    boot = normalize_product({"name": "Boot", "category": "Shoes", "price": 80}, "p1")
    await recs.put_products([boot])
    await recs.close()
    config = settings(checkpoint_interval_ms=60_000)  # nothing checkpointed before the crash
    first = await started(redis_url, config)
    view = normalized(track("ann", "Product Viewed", product_id="p1"))
    last = (await store.append([view]))[0]
    assert await first.wait_applied(last, timeout=5)
    [live] = await first.get_profiles(["ann"])
    assert live["recent"][-1][2:] == ["p1", "Shoes"]
    await crash(first)
    second = await started(redis_url, config)
    try:
        assert await second.wait_applied(last, timeout=5)
        [replayed] = await second.get_profiles(["ann"])
    finally:
        await second.stop()
    assert replayed["recent"] == live["recent"]


async def test_orders_replayed_after_a_crash_are_scored_against_every_shards_buyers(
    redis_url: str, store: Store, sync_redis: redis.Redis
) -> None:
    # Before its first flush a recovered shard scored RFM against its own buyers
    # only: an order replayed after a crash got another segment than it had live
    # (champions against new customers), and a segment rule could send an email
    # never decided live.
    import orjson

    from engine.insight.rfm import Population
    from engine.recs.store import rfm_key

    others = Population()  # another shard's published buyers: big spenders
    for i in range(50):
        others.add((T0 - i * 86400, float(1 + i % 10), 100.0 * (1 + i)))
    sync_redis.set(rfm_key(1), orjson.dumps(others.to_dict(), option=orjson.OPT_NON_STR_KEYS))
    config = settings(shards=2, checkpoint_interval_ms=60_000)
    two = Store(connect(redis_url), 2)
    ann = next(c for c in (f"ann{i}" for i in range(100)) if shard_for(c, 2) == 0)

    async def shard_0() -> ShardActor:
        actor = ShardActor(0, 2, config, redis_url, autostart=False)
        await actor.start()
        assert await poll_until(lambda: actor.ready)
        return actor

    try:
        first = await shard_0()
        order = track(ann, "Order Completed", order_id="o1", revenue=120.0, products=[])
        last = (await two.append([normalized(order, at=T0)]))[0]
        assert await first.wait_applied(last, timeout=5)
        [live] = await first.get_profiles([ann])
        await crash(first)
        second = await shard_0()
        try:
            assert await second.wait_applied(last, timeout=5)
            [replayed] = await second.get_profiles([ann])
        finally:
            await second.stop()
    finally:
        await two.close()
    assert live["rfm"]["segment"] != "champions"  # ranked among every shard's buyers
    assert replayed["rfm"] == live["rfm"]

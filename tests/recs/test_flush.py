"""A shard's flush to Redis: counts land as sums, and survive a Redis that is down."""

from __future__ import annotations

import time

import pytest

import engine.recs.store as recs_store
from actors.insight import InsightSettings, ShardInsight
from engine.insight.live import LiveInsight
from engine.partition import Partition
from engine.recs.cooccur import CoCounts, CoSettings
from engine.recs.settings import RecsConfig
from engine.recs.store import FlushIncomplete, RecsStore, co_key, pop_key
from engine.store import connect
from tests.recs.ports import closed_port_url
from tests.rules.harness import T0, event


def viewing_partition() -> Partition:
    partition = Partition(lambda c: True, insight=LiveInsight(co=CoSettings()))
    for n, (customer, product) in enumerate([("a", "p1"), ("a", "p2"), ("b", "p1"), ("b", "p2")]):
        partition.apply(event("Product Viewed", T0 + n, customer, product_id=product))
    return partition


async def test_flushes_from_two_shards_add_up_in_redis(redis_url: str, sync_redis) -> None:
    left, right = viewing_partition(), viewing_partition()
    pair = left.insight.counts.pairs[("p1", "p2")]
    for index, partition in enumerate((left, right)):
        shard = ShardInsight(index, 2, None)
        await shard.start(connect(redis_url))
        await shard.flush(partition)
        await shard.close()
    assert (
        sync_redis.zscore(co_key("p1"), "p2") == 2 * pair == sync_redis.zscore(co_key("p2"), "p1")
    )
    assert sync_redis.zcard(pop_key("")) == 2
    assert not sync_redis.exists("nudge:recs:mass")  # the shop's popularity holds the mass
    assert right.insight.merged is not None and len(right.insight.merged) == 0  # no buyers


async def test_a_failed_flush_keeps_its_counts_for_the_next(redis_url: str, sync_redis) -> None:
    partition = viewing_partition()
    pair = partition.insight.counts.pairs[("p1", "p2")]
    shard = ShardInsight(0, 1, None)
    shard.store = RecsStore(connect(closed_port_url()))
    await shard.flush(partition)
    assert shard.errors == 1
    assert partition.insight.counts.pairs[("p1", "p2")] == pair  # handed back, not lost
    await shard.store.close()
    await shard.start(connect(redis_url))
    await shard.flush(partition)
    await shard.close()
    assert sync_redis.zscore(co_key("p1"), "p2") == pair


def two_pairs() -> Partition:
    """p1 with p2 (customer a), p3 with p4 (customer b): two pairs, four items."""
    partition = Partition(lambda c: True, insight=LiveInsight(co=CoSettings()))
    for n, (customer, product) in enumerate([("a", "p1"), ("a", "p2"), ("b", "p3"), ("b", "p4")]):
        partition.apply(event("Product Viewed", T0 + n, customer, product_id=product))
    return partition


async def test_a_flush_failing_part_way_hands_back_exactly_what_did_not_land(
    redis_url: str, sync_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recs_store, "_CHUNK_PAIRS", 1)  # one pair per Lua call
    partition = two_pairs()
    weights = dict(partition.insight.counts.pairs)
    masses = dict(partition.insight.counts.mass)
    sync_redis.set(co_key("p3"), "not a sorted set")  # the second call fails on it
    shard = ShardInsight(0, 1, None)
    await shard.start(connect(redis_url))
    await shard.flush(partition)
    assert shard.errors == 1
    assert sync_redis.zscore(co_key("p1"), "p2") == weights[("p1", "p2")]
    assert partition.insight.counts.pairs == {("p3", "p4"): weights[("p3", "p4")]}
    sync_redis.delete(co_key("p3"))
    await shard.flush(partition)
    await shard.close()
    assert shard.errors == 1
    # the pair that landed the first time is not added twice
    assert sync_redis.zscore(co_key("p1"), "p2") == weights[("p1", "p2")]
    assert sync_redis.zscore(co_key("p4"), "p3") == weights[("p3", "p4")]
    landed = sync_redis.zrange(pop_key(""), 0, -1, withscores=True)
    assert {k.decode(): v for k, v in landed} == masses


async def test_the_store_names_the_unsent_counts(redis_url: str, sync_redis, monkeypatch) -> None:
    monkeypatch.setattr(recs_store, "_CHUNK_PAIRS", 1)
    counts = two_pairs().insight.counts.take()
    sync_redis.set(co_key("p3"), "x")
    store = RecsStore(connect(redis_url))
    with pytest.raises(FlushIncomplete) as failed:
        await store.flush(counts, {}, keep_neighbors=10)
    await store.close()
    unsent = failed.value.unsent
    assert set(unsent.pairs) == {("p3", "p4")}
    assert isinstance(unsent, CoCounts)
    # the first call took one shop-wide popularity; the rest come back, as mass too
    assert len(unsent.popular[""]) == 3 and unsent.mass == unsent.popular[""]


async def test_a_due_flush_runs_in_the_background_within_its_pair_budget(
    redis_url: str, sync_redis
) -> None:
    partition = two_pairs()
    partition.apply(event("Product Viewed", T0 + 9, "a", product_id="p2"))
    partition.apply(event("Product Viewed", T0 + 10, "a", product_id="p1"))  # p1-p2 twice
    pairs = partition.insight.counts.pairs
    heavy, light = pairs[("p1", "p2")], pairs[("p3", "p4")]
    assert heavy > light
    recs = RecsConfig(flush_interval_s=1.0, flush_pairs_per_s=1)  # one pair per flush
    shard = ShardInsight(0, 1, InsightSettings(recs=recs))
    await shard.start(connect(redis_url))
    await shard.run_due(partition, T0 + 11)
    assert shard._flushing is not None and not shard._flushing.done()
    await shard.settle()
    assert partition.insight.counts.pairs == {("p3", "p4"): light}
    assert sync_redis.zscore(co_key("p2"), "p1") == heavy
    assert sync_redis.zscore(co_key("p3"), "p4") is None  # lighter: waits for a later flush
    await shard.flush(partition)  # a full flush (stop, admin) sends everything
    await shard.close()
    assert sync_redis.zscore(co_key("p3"), "p4") is not None
    assert partition.insight.counts.pairs == {}


async def test_shards_flush_in_turn_after_the_first_flush(redis_url: str) -> None:
    # Started together, four shards flushing together every interval competed for
    # the cores (and Redis) at once: after its first flush each keeps its own phase.
    recs = RecsConfig(flush_interval_s=4.0)
    nexts = []
    for index in range(4):
        shard = ShardInsight(index, 4, InsightSettings(recs=recs))
        await shard.start(connect(redis_url))
        before = time.monotonic()
        await shard.run_due(two_pairs(), T0)  # the first flush: at once, for every shard
        assert shard._flushing is not None
        await shard.settle()
        nexts.append(shard._next_flush - before)
        await shard.run_due(two_pairs(), T0)  # not due again yet
        assert shard.flushes == 1
        await shard.close()
    assert [round(n) for n in nexts] == [4, 5, 6, 7]


async def test_shard_0_drops_the_retired_mass_zset_at_start(redis_url: str, sync_redis) -> None:
    sync_redis.zadd("nudge:recs:mass", {"p1": 1.0})
    sync_redis.zadd(pop_key(""), {"p1": 1.0})
    other = ShardInsight(1, 2, None)
    await other.start(connect(redis_url))
    await other.close()
    assert sync_redis.exists("nudge:recs:mass")  # one shard does it
    first = ShardInsight(0, 2, None)
    await first.start(connect(redis_url))
    await first.close()
    assert not sync_redis.exists("nudge:recs:mass")
    assert sync_redis.zscore(pop_key(""), "p1") == 1.0


async def test_ill_typed_product_facts_in_events_never_reach_recommendations(
    redis_url: str, sync_redis
) -> None:
    # A list for a category (events are not checked as catalog entries are) was kept
    # as the product's description, and ranking a shortlist holding it raised for
    # every customer: the recommendations block fell back shop-wide.
    from engine.recs.recommender import CollaborativeRecommender

    partition = Partition(lambda c: True, insight=LiveInsight(co=CoSettings()))
    facts = [
        {"category": "Shoes", "price": "12.5", "name": "Runner"},
        {"category": ["Shoes", "Sale"], "price": float("nan"), "name": {"en": "Lamp"}},
        {"category": 7, "price": -1, "url": "https://shop.example/p3"},
    ]
    for n, props in enumerate(facts):
        partition.apply(event("Product Viewed", T0 + n, "a", product_id=f"p{n + 1}", **props))
    shard = ShardInsight(0, 1, None)
    await shard.start(connect(redis_url))
    await shard.flush(partition)
    await shard.close()
    # and one stored before the check, as a shop upgrading may have them
    sync_redis.hset("nudge:catalog:seen", "p4", '{"category": {"a": 1}, "price": "x"}')
    sync_redis.zadd(pop_key(""), {"p4": 1.0})
    recommender = CollaborativeRecommender(redis_url, RecsConfig())
    try:
        items = await recommender.recommend({"id": "zed", "recent": [], "cart": {}}, limit=5)
        products = await recommender.store.get_products(["p1", "p2", "p3", "p4"])
    finally:
        await recommender.close()
    assert sorted(item["product_id"] for item in items) == ["p1", "p2", "p3", "p4"]
    # p2 said nothing usable, so nothing is kept for it
    assert {pid: {k: v for k, v in p.items() if k != "id"} for pid, p in products.items()} == {
        "p1": {"category": "Shoes", "price": 12.5, "name": "Runner", "source": "events"},
        "p3": {"category": "7", "url": "https://shop.example/p3", "source": "events"},
        "p4": {"source": "events"},
    }


async def test_the_recent_interest_fill_obeys_stock_and_category_caps(redis_url: str) -> None:
    # The fill after the ranked list skipped both filters for products outside the
    # shortlist: a lamp the catalog marks sold out was recommended.
    from engine.recs.catalog import normalize_product
    from engine.recs.recommender import CollaborativeRecommender
    from engine.recs.store import RecsStore

    recs = RecsStore(connect(redis_url))
    await recs.put_products(
        [
            normalize_product({"name": "Mug", "price": 5}, "mug"),
            normalize_product({"name": "Lamp", "price": 90, "in_stock": False}, "lamp"),
        ]
    )
    await recs.close()
    partition = Partition(lambda c: True, insight=LiveInsight(co=CoSettings()))
    partition.apply(event("Product Viewed", T0, "bob", product_id="mug"))  # the shop so far
    shard = ShardInsight(0, 1, None)
    await shard.start(connect(redis_url))
    await shard.flush(partition)
    await shard.close()
    recent = [
        [T0 + 5, "Product Viewed", "lamp", "Home"],
        [T0 + 6, "Product Viewed", "sock-1", "Socks"],
        [T0 + 7, "Product Viewed", "sock-2", "Socks"],
    ]
    ann = {"id": "ann", "recent": recent, "purchased": [], "cart": {}}
    recommender = CollaborativeRecommender(redis_url, RecsConfig(max_per_category=1))
    try:
        items = await recommender.recommend(ann, limit=4)
    finally:
        await recommender.close()
    assert [(item["product_id"], item["reason"]) for item in items] == [
        ("mug", "popular"),
        ("sock-2", "recent_interest"),  # one Socks at most; the lamp is sold out
    ]
    assert items[1]["category"] == "Socks"

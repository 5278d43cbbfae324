"""A shard's flush to Redis: counts land as sums, and survive a Redis that is down."""

from __future__ import annotations

from actors.insight import ShardInsight
from engine.insight.live import LiveInsight
from engine.partition import Partition
from engine.recs.cooccur import CoSettings
from engine.recs.store import MASS, RecsStore, co_key
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
    assert sync_redis.zcard(MASS) == 2
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

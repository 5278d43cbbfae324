"""Where recommendation data lives in Redis: the catalog, merged counts, RFM populations.

Keys (all under `nudge:`):
  catalog                 hash  product id -> product JSON (the admin API, `nudge catalog import`)
  catalog:seen            hash  product id -> what events said about it (first description wins)
  catalog:version         int   bumped on every catalog write, so shards know to reload
  recs:co:{id}            zset  neighbour -> co-occurrence weight (top `keep_neighbors` kept)
  recs:mass               zset  product -> its own decayed event weight
  recs:pop:{category}     zset  product -> popularity in the category ("recs:pop:" for all)
  rfm:part:{shard}        str   the shard's share of the RFM population (JSON)

Shards add their co-occurrence deltas with ZINCRBY, so Redis itself is the
merge: addition commutes, and every shard's flush lands whole in one pipeline.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from engine.recs.cooccur import CoCounts

CATALOG, SEEN, VERSION = "nudge:catalog", "nudge:catalog:seen", "nudge:catalog:version"
MASS = "nudge:recs:mass"


def co_key(item: str) -> str:
    return f"nudge:recs:co:{item}"


def pop_key(category: str) -> str:
    return f"nudge:recs:pop:{category}"


def rfm_key(shard: int) -> str:
    return f"nudge:rfm:part:{shard}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RecsStore:
    """The recommendation keys of one Redis."""

    def __init__(self, client: aioredis.Redis):
        self.redis = client

    async def close(self) -> None:
        await self.redis.aclose()

    # -- catalog ---------------------------------------------------------------------
    async def put_products(self, products: list[dict]) -> None:
        """Upsert checked products (one round trip) and bump the catalog version."""
        if not products:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(CATALOG, mapping={p["id"]: orjson.dumps(p) for p in products})
            pipe.incr(VERSION)
            await pipe.execute()

    async def get_products(self, ids: list[str]) -> dict[str, dict]:
        """Products by id: the catalog's, else what events said (marked source=events)."""
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(CATALOG, ids)
            pipe.hmget(SEEN, ids)
            listed, seen = await pipe.execute()
        out: dict[str, dict] = {}
        for pid, own, described in zip(ids, listed, seen, strict=True):
            if own is not None:
                out[pid] = {**orjson.loads(own), "source": "catalog"}
            elif described is not None:
                out[pid] = {"id": pid, **orjson.loads(described), "source": "events"}
        return out

    async def catalog_version(self) -> int:
        return int(await self.redis.get(VERSION) or 0)

    async def load_catalog(self) -> dict[str, dict]:
        """The whole catalog (for a shard's event enrichment)."""
        raw = await self.redis.hgetall(CATALOG)
        return {_text(k): orjson.loads(v) for k, v in raw.items()}

    # -- shard flushes ---------------------------------------------------------------
    async def flush(
        self,
        counts: CoCounts | None,
        described: dict[str, dict],
        *,
        keep_neighbors: int,
    ) -> None:
        """Add one shard's counts and product descriptions (one pipeline)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if counts is not None:
                for item, row in counts.adjacency().items():
                    key = co_key(item)
                    for other, w in row.items():
                        pipe.zincrby(key, w, other)
                    pipe.zremrangebyrank(key, 0, -(keep_neighbors + 1))
                for item, w in counts.mass.items():
                    pipe.zincrby(MASS, w, item)
                for category, table in counts.popular.items():
                    key = pop_key(category)
                    for item, w in table.items():
                        pipe.zincrby(key, w, item)
            for pid, product in described.items():
                pipe.hsetnx(SEEN, pid, orjson.dumps(product))
            await pipe.execute()

    async def publish_population(self, shard: int, data: dict, shards: int) -> list[dict]:
        """Publish this shard's RFM population; every shard's published ones come back."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(rfm_key(shard), orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))
            pipe.mget([rfm_key(i) for i in range(shards)])
            _, parts = await pipe.execute()
        return [orjson.loads(p) for p in parts if p is not None]

    # -- reading for recommendations ------------------------------------------------
    async def neighbors(
        self, seeds: list[str], n: int, categories: list[str], popular_n: int
    ) -> tuple[dict[str, list[tuple[str, float]]], dict[str, list[tuple[str, float]]]]:
        """(seed -> top neighbours, category -> most popular; "" for the whole shop)."""
        wanted = [*dict.fromkeys(categories), ""]
        async with self.redis.pipeline(transaction=False) as pipe:
            for seed in seeds:
                pipe.zrevrange(co_key(seed), 0, n - 1, withscores=True)
            for category in wanted:
                pipe.zrevrange(pop_key(category), 0, popular_n - 1, withscores=True)
            replies = await pipe.execute()
        neighbors = {
            seed: [(_text(m), float(s)) for m, s in reply]
            for seed, reply in zip(seeds, replies[: len(seeds)], strict=True)
        }
        popular = {
            category: [(_text(m), float(s)) for m, s in reply]
            for category, reply in zip(wanted, replies[len(seeds) :], strict=True)
        }
        return neighbors, popular

    async def masses(self, items: list[str]) -> dict[str, float]:
        if not items:
            return {}
        values = await self.redis.zmscore(MASS, items)
        return {i: float(v) for i, v in zip(items, values, strict=True) if v is not None}

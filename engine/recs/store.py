"""Where recommendation data lives in Redis: the catalog, merged counts, RFM populations.

Keys (all under `nudge:`):
  catalog                 hash  product id -> product JSON (the admin API, `nudge catalog import`)
  catalog:seen            hash  product id -> what events said about it (first description wins)
  catalog:version         int   bumped on every catalog write, so shards know to reload
  recs:co:{id}            zset  neighbour -> co-occurrence weight (top `keep_neighbors` kept)
  recs:pop:{category}     zset  product -> popularity in the category ("recs:pop:" for all)
                                (an item's "mass" in similarity is its "recs:pop:" score: the
                                two always received the same increments, so one zset holds it)
  rfm:part:{shard}        str   the shard's share of the RFM population (JSON)

Shards add their co-occurrence deltas with ZINCRBY, so Redis itself is the
merge: addition commutes. A flush is tens of thousands of increments, so it
goes as Lua calls of `_CHUNK_PAIRS` pairs each, the deltas packed in one JSON
argument: one redis-py command per increment cost the shard about 20 µs each
(75 µs per event on the ingest benchmark), and short calls keep Redis free for
ingest in between.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from engine.errors import StoreError
from engine.recs.catalog import event_facts
from engine.recs.cooccur import CoCounts

CATALOG, SEEN, VERSION = "nudge:catalog", "nudge:catalog:seen", "nudge:catalog:version"
# Keys earlier versions wrote and nothing reads any more: dropped once at start.
RETIRED = ("nudge:recs:mass",)  # a copy of recs:pop: (until 59e574c)


_CO_PREFIX = "nudge:recs:co:"
# Pairs (and single increments) per Lua call. Ingest's XADDs wait behind a running
# call: 100 took 1.5 ms of Redis on an idle machine and 3.5-13 ms under the ingest
# benchmark's load (Redis shares the CPUs); 32 take 0.6 ms idle.
_CHUNK_PAIRS = 32

# KEYS[1]: the co-occurrence key prefix; ARGV[1]: JSON [pairs, singles] where
# pairs is [a, b, w, ...] (both directions added) and singles is [key, member, w, ...].
# Redis turns Lua numbers into arguments with %.17g, so weights round-trip exactly.
_ADD = """
local data = cjson.decode(ARGV[1])
local pairs_, singles = data[1], data[2]
local prefix = KEYS[1]
for i = 1, #pairs_, 3 do
  local a, b, w = pairs_[i], pairs_[i + 1], pairs_[i + 2]
  redis.call('ZINCRBY', prefix .. a, w, b)
  redis.call('ZINCRBY', prefix .. b, w, a)
end
for i = 1, #singles, 3 do
  redis.call('ZINCRBY', singles[i], singles[i + 2], singles[i + 1])
end
return #pairs_ / 3
"""
# KEYS[1]: the prefix; ARGV[1]: neighbours kept; ARGV[2]: JSON list of items to trim.
_TRIM = """
local keep = tonumber(ARGV[1])
for _, item in ipairs(cjson.decode(ARGV[2])) do
  local key = KEYS[1] .. item
  if redis.call('ZCARD', key) > keep then
    redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
  end
end
return 0
"""


class FlushIncomplete(StoreError):
    """Part of a flush reached Redis; `unsent` holds the counts that did not."""

    def __init__(self, message: str, unsent: CoCounts):
        super().__init__(message)
        self.unsent = unsent


def _unsent(
    counts: CoCounts, pairs: list[tuple[tuple[str, str], float]], singles: list
) -> CoCounts:
    """The part of a flush that did not reach Redis, as counts to flush again."""
    unsent = CoCounts(counts.settings)
    unsent.pairs = dict(pairs)
    categories = {pop_key(c): c for c in counts.popular}
    for key, item, w in singles:
        category = categories[key]
        table = unsent.popular.setdefault(category, {})
        table[item] = table.get(item, 0.0) + w
        if category == "":  # an item's mass is its whole-shop popularity, kept alike
            unsent.mass[item] = unsent.mass.get(item, 0.0) + w
    return unsent


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

    async def drop_retired(self) -> int:
        """UNLINK the keys earlier versions wrote and nothing reads; how many existed."""
        return int(await self.redis.unlink(*RETIRED))

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
                # checked again: a description stored before event_facts may hold anything
                facts = event_facts(orjson.loads(described))
                out[pid] = {"id": pid, **facts, "source": "events"}
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
        """Add one shard's counts and product descriptions to Redis.

        Raises FlushIncomplete with the counts not yet added when a call fails
        part way, so the caller can keep exactly those for its next flush.
        """
        if described:
            async with self.redis.pipeline(transaction=False) as pipe:
                for pid, product in described.items():
                    pipe.hsetnx(SEEN, pid, orjson.dumps(product))
                await pipe.execute()
        if counts is None:
            return
        pairs = list(counts.pairs.items())
        # No separate mass zset: counts.mass equals counts.popular[""] (both take every
        # increment), and readers take an item's mass from "recs:pop:".
        singles: list[tuple[str, str, float]] = []
        for category, table in counts.popular.items():
            key = pop_key(category)
            singles.extend((key, item, w) for item, w in table.items())
        chunks = max(-(-len(pairs) // _CHUNK_PAIRS), -(-len(singles) // _CHUNK_PAIRS), 1)
        add = self.redis.register_script(_ADD)
        for n in range(chunks):
            lo, hi = n * _CHUNK_PAIRS, (n + 1) * _CHUNK_PAIRS
            flat_pairs = [x for (a, b), w in pairs[lo:hi] for x in (a, b, w)]
            flat_singles = [x for single in singles[lo:hi] for x in single]
            try:
                await add(keys=[_CO_PREFIX], args=[orjson.dumps([flat_pairs, flat_singles])])
            except Exception as exc:
                raise FlushIncomplete(
                    f"recommendation flush failed: {exc}", _unsent(counts, pairs[lo:], singles[lo:])
                ) from exc
        # Trimmed once per flush, not per chunk: a chunk touches most hot items.
        touched = list({item for pair, _ in pairs for item in pair})
        trim = self.redis.register_script(_TRIM)
        try:
            for lo in range(0, len(touched), _CHUNK_PAIRS):
                await trim(
                    keys=[_CO_PREFIX],
                    args=[keep_neighbors, orjson.dumps(touched[lo : lo + _CHUNK_PAIRS])],
                )
        except Exception as exc:  # the counts are in; the next flush trims these keys again
            raise FlushIncomplete(
                f"recommendation trim failed: {exc}", CoCounts(counts.settings)
            ) from exc

    async def publish_population(self, shard: int, data: dict, shards: int) -> list[dict]:
        """Publish this shard's RFM population; every shard's published ones come back."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(rfm_key(shard), orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))
            pipe.mget([rfm_key(i) for i in range(shards)])
            _, parts = await pipe.execute()
        return [orjson.loads(p) for p in parts if p is not None]

    async def populations(self, shards: int) -> list[dict]:
        """Every shard's last published RFM population (a recovering shard reads them)."""
        parts = await self.redis.mget([rfm_key(i) for i in range(shards)])
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
        """Each item's mass (its decayed event weight over the whole shop), where known."""
        if not items:
            return {}
        values = await self.redis.zmscore(pop_key(""), items)
        return {i: float(v) for i, v in zip(items, values, strict=True) if v is not None}

"""The collaborative-filtering Recommender behind the `recommendations` content block.

Reads the counts every shard merged into Redis (engine.recs.store) in three
small round trips: the seeds' neighbours and the popular lists; the
candidates' masses; the catalog entries of the best few candidates only.
Ranking is engine.recs.rank, the same code the offline evaluation scores.
Items carry the catalog's name, price, url, image_url and category (or what
events said of a product the catalog lacks); out-of-stock products never
appear. When Redis holds too little (a new shop), the list is filled with
what the customer recently looked at (the interim recent-interest
recommender).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.clock import Clock, SystemClock
from engine.content.recommend import recent_interest
from engine.recs.rank import excluded, pick, ranked, seeds_of
from engine.recs.settings import RecsConfig, co_settings, rank_settings
from engine.recs.store import RecsStore
from engine.store import connect

_SHOWN = ("name", "price", "url", "image_url", "category", "brand")


class CollaborativeRecommender:
    """Item-to-item CF with category popularity as the cold-start fallback."""

    def __init__(
        self,
        redis_url: str,
        config: RecsConfig | None = None,
        *,
        clock: Clock | None = None,
        store: RecsStore | None = None,
    ):
        self.config = config or RecsConfig()
        self.co = co_settings(self.config)
        self.rank = rank_settings(self.config)
        self.clock = clock or SystemClock()
        self._redis_url = redis_url
        self._store = store

    @property
    def store(self) -> RecsStore:
        if self._store is None:  # made on first use, on the serving event loop
            self._store = RecsStore(connect(self._redis_url))
        return self._store

    async def close(self) -> None:
        """Release the Redis connections."""
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def recommend(self, profile: Mapping[str, Any], *, limit: int) -> list[dict]:
        """Up to `limit` products for the customer of `profile`, best first."""
        if limit <= 0:
            return []
        now = self.clock.now()
        seeds = seeds_of(profile, now, self.co, self.rank)
        categories = _categories(profile)
        store = self.store
        want = max(limit * 5, 20)
        neighbors, popular = await store.neighbors(
            list(seeds), self.config.neighbors, categories, want
        )
        candidates = {item for row in neighbors.values() for item, _ in row}
        fallback = [
            (item, value, "popular_in_category" if category else "popular")
            for category in [*categories, ""]
            for item, value in popular.get(category, ())
        ]
        masses = await store.masses(list(dict.fromkeys([*seeds, *candidates])))
        stream = ranked(seeds, neighbors, masses, fallback, self.rank)
        exclude = excluded(profile, now, self.rank)
        # catalog entries only for what can make the list: the best few of the stream
        shortlist: dict[str, None] = {}
        for item, _, _ in stream:
            if item not in exclude and item not in shortlist:
                shortlist[item] = None
                if len(shortlist) >= want:
                    break
        products = await store.get_products(list(shortlist))
        candidates = [entry for entry in stream if entry[0] in shortlist]
        seen_in: dict[str, str] = {}  # a category the customer's own events gave

        def picked() -> list[dict]:
            return pick(
                candidates,
                limit=limit,
                exclude=exclude,
                settings=self.rank,
                category_of=lambda item: (
                    (products.get(item) or {}).get("category") or seen_in.get(item)
                ),
                in_stock=lambda item: (products.get(item) or {}).get("in_stock", True),
            )

        items = picked()
        if len(items) < limit:
            # Nothing counted yet (a new shop) or a thin history: what this customer
            # looked at comes after, through the same filters (stock, category caps).
            fill = []
            for entry in recent_interest(profile, limit=want):
                if entry["product_id"] not in shortlist:
                    fill.append((entry["product_id"], entry["score"], "recent_interest"))
                    if entry["category"]:
                        seen_in[entry["product_id"]] = entry["category"]
            if fill:
                products.update(await store.get_products([item for item, _, _ in fill]))
                candidates += fill
                items = picked()
        for item in items:
            product = products.get(item["product_id"]) or {}
            for name in _SHOWN:
                if product.get(name) is not None and item.get(name) is None:
                    item[name] = product[name]
        return items


def _categories(profile: Mapping[str, Any]) -> list[str]:
    """The customer's recent categories, most frequent first (for the popularity fallback)."""
    tally: dict[str, int] = {}
    for entry in profile.get("recent") or ():
        if entry[3]:
            tally[entry[3]] = tally.get(entry[3], 0) + 1
    for line in (profile.get("cart") or {}).values():
        category = line.get("category")
        if isinstance(category, str) and category:
            tally[category] = tally.get(category, 0) + 2
    return [c for c, _ in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))[:3]]

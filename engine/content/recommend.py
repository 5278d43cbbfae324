"""The recommender seam of the `recommendations` block, and its interim default.

INTERIM: `RecentInterestRecommender` knows only the customer's own profile, so it
can only suggest products this customer has already shown interest in (viewed,
clicked, added then removed) and has neither in the cart nor bought, ranked by
how recent and strong that interest is and by how much of the customer's
attention their category holds. It finds nothing new to the customer; a real
recommender (collaborative filtering over all customers) replaces it later by
implementing `Recommender`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

# How much one event says about interest in its product.
_WEIGHTS = {
    "Product Viewed": 1.0,
    "Product Clicked": 1.5,
    "Product Added": 3.0,  # added, then removed or still unbought: strong interest
    "Product Removed": 0.5,
    "Product Added to Wishlist": 3.0,
}


class Recommender(Protocol):
    """Products for one customer, best first; each item a dict with at least product_id.

    Items may also carry name, price, url, image_url, category, score and reason;
    the block fills a missing url from `content.product_url`. A recommender that
    needs I/O returns an awaitable (it then runs in parallel, within its budget);
    one that can answer at once returns the list itself, which saves a task.
    """

    def recommend(
        self, profile: Mapping[str, Any], *, limit: int
    ) -> list[dict] | Awaitable[list[dict]]: ...


def recent_interest(
    profile: Mapping[str, Any], *, limit: int, half_life_s: float = 7 * 86400.0
) -> list[dict]:
    """Products from the profile's recent events, ranked; excludes cart and purchases.

    Time is measured back from the newest recent event, so the result depends
    on the profile alone. Example: views of p1 (Shoes) twice and p2 (Bags) once,
    p3 in the cart: [p1, p2], p1 first.
    """
    recent = profile.get("recent")
    if not recent or limit <= 0:
        return []
    cart, purchased = profile.get("cart"), profile.get("purchased")
    exclude = set(cart) if cart else set()
    if purchased:
        exclude.update([str(entry[1]) for entry in purchased])
    newest = max([entry[0] for entry in recent])
    weights, exp2 = _WEIGHTS, math.exp2
    # Per product, one list [score, last seen, category] rather than a dict for each.
    found: dict[str, list] = {}
    category_weight: dict[str, float] = {}
    total = 0.0
    for ts, event, product, category in recent:
        weight = weights.get(event)
        if weight is None or product is None:
            continue
        decayed = weight * exp2(-(newest - ts) / half_life_s)
        total += decayed
        if category:
            category_weight[category] = category_weight.get(category, 0.0) + decayed
        if type(product) is not str:
            product = str(product)
        if product in exclude:
            continue
        seen = found.get(product)
        if seen is None:
            found[product] = [decayed, ts, category or None]
            continue
        seen[0] += decayed
        if ts > seen[1]:
            seen[1] = ts
        if category:
            seen[2] = category
    ranked = []
    for product, (score, last_seen, category) in found.items():
        affinity = category_weight.get(category, 0.0) / total if category and total else 0.0
        ranked.append((score * (1.0 + affinity), last_seen, product, category))
    ranked.sort(reverse=True)  # products are distinct: categories are never compared
    return [
        {
            "product_id": product,
            "category": category,
            "score": round(score, 4),
            "reason": "recent_interest",
        }
        for score, _, product, category in ranked[:limit]
    ]


class RecentInterestRecommender:
    """INTERIM default Recommender: `recent_interest` over the profile alone."""

    def __init__(self, *, half_life_s: float = 7 * 86400.0):
        self.half_life_s = half_life_s

    def recommend(self, profile: Mapping[str, Any], *, limit: int) -> list[dict]:
        """Up to `limit` products this customer recently showed interest in (at once)."""
        return recent_interest(profile, limit=limit, half_life_s=self.half_life_s)

"""Turn co-occurrence into a customer's recommendations (pure).

Shared by the live recommender (neighbours read from Redis) and the offline
evaluation (neighbours from an in-memory CoCounts), so both rank the same way.

1. Seeds: the customer's recent products, cart and purchases, each weighted
   by its event (view < add < purchase) and halved every `seed_half_life_s`.
2. Candidates: every neighbour c of a seed s scores
   sum_s seed(s) * co(s, c) / sqrt(mass(s) * mass(c)).
3. Filters: products bought within `exclude_bought_s`, in the cart, out of
   stock, or over their category's limit are dropped.
4. Fallback: fewer than `limit` left? fill with the most popular products of
   the seeds' categories, then of the whole shop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.recs.cooccur import CoSettings


@dataclass(frozen=True)
class RankSettings:
    """Filters and limits of one recommendation list."""

    seeds: int = 10
    seed_half_life_s: float = 14 * 86400.0
    exclude_bought_s: float = 7 * 86400.0
    max_per_category: int = 0  # 0: no limit
    # weight of popularity (0..1 of the best-selling item) added to every candidate's score:
    # sparse co-occurrence evidence is noisy, and a popular neighbour is a safer bet
    popularity_blend: float = 2.0
    category_limits: Mapping[str, int] = field(default_factory=dict)


def seeds_of(
    profile: Mapping[str, Any], now: float, co: CoSettings, settings: RankSettings
) -> dict[str, float]:
    """The customer's products to start from, with weights; the strongest `settings.seeds`."""
    half = settings.seed_half_life_s
    weights: dict[str, float] = {}

    def bump(item: Any, w: float, ts: float) -> None:
        if item is None or w <= 0:
            return
        item = str(item)
        age = max(now - ts, 0.0)
        weights[item] = weights.get(item, 0.0) + w * math.exp2(-age / half)

    for entry in profile.get("recent") or ():
        bump(entry[2], co.weight(entry[1]), entry[0])
    for ts, item in profile.get("purchased") or ():
        bump(item, co.purchase_weight, ts)
    for item, line in (profile.get("cart") or {}).items():
        bump(item, co.add_weight, line.get("added_at") or now)
    best = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[: settings.seeds]
    return dict(best)


def excluded(profile: Mapping[str, Any], now: float, settings: RankSettings) -> set[str]:
    """Products never to recommend now: bought within the window, or in the cart."""
    out = {str(item) for item in (profile.get("cart") or {})}
    horizon = now - settings.exclude_bought_s
    for ts, item in profile.get("purchased") or ():
        if ts >= horizon:
            out.add(str(item))
    return out


def score(
    seeds: Mapping[str, float],
    neighbors: Mapping[str, Iterable[tuple[str, float]]],
    mass: Mapping[str, float],
) -> dict[str, float]:
    """Candidate -> similarity-weighted score over all seeds."""
    scores: dict[str, float] = {}
    for seed, seed_weight in seeds.items():
        seed_mass = mass.get(seed) or 0.0
        if seed_mass <= 0:
            continue
        for item, co in neighbors.get(seed) or ():
            if item == seed:
                continue
            item_mass = mass.get(item) or 0.0
            if item_mass <= 0:
                continue
            # Two roots, not the root of a product: masses grow with forward decay
            # (engine.recs.cooccur), and their product would overflow long before either.
            scores[item] = scores.get(item, 0.0) + seed_weight * co / (
                math.sqrt(seed_mass) * math.sqrt(item_mass)
            )
    return scores


def pick(
    ranked: Iterable[tuple[str, float, str]],
    *,
    limit: int,
    exclude: set[str],
    settings: RankSettings,
    category_of: Callable[[str], str | None],
    in_stock: Callable[[str], bool],
) -> list[dict]:
    """The first `limit` of (item, score, reason) that pass every filter, in order."""
    out: list[dict] = []
    taken: set[str] = set()
    per_category: dict[str, int] = {}
    for item, value, reason in ranked:
        if len(out) >= limit:
            break
        if item in taken or item in exclude or not in_stock(item):
            continue
        category = category_of(item)
        if category:
            cap = settings.category_limits.get(category, settings.max_per_category)
            if cap and per_category.get(category, 0) >= cap:
                continue
            per_category[category] = per_category.get(category, 0) + 1
        taken.add(item)
        out.append(
            {"product_id": item, "category": category, "score": round(value, 6), "reason": reason}
        )
    return out


def ranked(
    seeds: Mapping[str, float],
    neighbors: Mapping[str, Iterable[tuple[str, float]]],
    mass: Mapping[str, float],
    popular: Iterable[tuple[str, float, str]],
    settings: RankSettings,
) -> list[tuple[str, float, str]]:
    """Every candidate as (item, score, reason), best first: collaborative, then `popular`.

    With `popularity_blend`, each collaborative score (normalized to the best
    one) gets blend x its popularity relative to the bestseller added, and
    popular items without co-occurrence evidence compete on that alone.
    """
    scores = score(seeds, neighbors, mass)
    evidence = set(scores)  # items some seed co-occurs with
    popular = list(popular)
    reasons = {item: reason for item, _, reason in reversed(popular)}
    blend = settings.popularity_blend
    if blend > 0 and scores and popular:
        top = max(value for _, value, _ in popular) or 1.0
        cf_top = max(scores.values()) or 1.0
        prior = {item: value / top for item, value, _ in popular}
        scores = {
            item: value / cf_top + blend * prior.get(item, 0.0) for item, value in scores.items()
        }
        for item, value in prior.items():
            if item not in scores:
                scores[item] = blend * value * 0.999  # CF evidence wins ties
    order = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    stream = [
        (item, value, "also_liked" if item in evidence else reasons[item]) for item, value in order
    ]
    stream.extend(popular)
    return stream


def recommend(
    seeds: Mapping[str, float],
    neighbors: Mapping[str, Iterable[tuple[str, float]]],
    mass: Mapping[str, float],
    popular: Iterable[tuple[str, float, str]],
    *,
    limit: int,
    exclude: set[str],
    settings: RankSettings,
    category_of: Callable[[str], str | None] = lambda item: None,
    in_stock: Callable[[str], bool] = lambda item: True,
) -> list[dict]:
    """Collaborative candidates best first, then `popular` (item, score, reason) as fallback."""
    return pick(
        ranked(seeds, neighbors, mass, popular, settings),
        limit=limit,
        exclude=exclude,
        settings=settings,
        category_of=category_of,
        in_stock=in_stock,
    )

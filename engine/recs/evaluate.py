"""`nudge recs evaluate --data FILE`: offline hit rate and NDCG of the recommender.

A time split of real transactions: every invoice before the cutoff (by
default 90 days before the last one) trains the co-occurrence counts exactly
as the shards would count live purchases; then, for every customer who
bought before the cutoff and again after it, the customer's next purchase
after the cutoff is the truth. Hit rate@K: the share of those customers for
whom any product of that next order is in the top K. NDCG@K: the ranking
quality of the products of that order in the list. The baseline is the most
popular products of the training period, with the same exclusions.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.insight.retail import Invoice, read_invoices
from engine.recs.cooccur import CoCounts, CoSettings
from engine.recs.rank import RankSettings, excluded, recommend, seeds_of

DAY = 86400.0


@dataclass
class Result:
    """Figures of one evaluation."""

    customers: int
    hit_rate: float
    ndcg: float
    baseline_hit_rate: float
    baseline_ndcg: float
    recent_hit_rate: float  # the fallback alone: popularity with the same forward decay
    recent_ndcg: float
    train_invoices: int
    cutoff: float
    k: int


def ndcg_at(ranked: list[str], truth: set[str], k: int) -> float:
    """NDCG@k with binary relevance. Example: truth {b}, ranked [a, b] -> 1/log2(3) = 0.63."""
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in truth)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(truth), k)))
    return dcg / ideal if ideal else 0.0


def train(invoices: list[Invoice], settings: CoSettings) -> tuple[CoCounts, dict[str, dict]]:
    """Co-occurrence counts of `invoices` (oldest first), and each customer's profile-like view."""
    counts = CoCounts(settings)
    profiles: dict[str, dict] = {}
    for invoice in invoices:
        profile = profiles.setdefault(invoice.customer, {"recent": [], "purchased": []})
        if not invoice.items:
            continue
        history = _history(profile["purchased"], invoice.ts, settings, set(invoice.items))
        counts.observe(invoice.items, settings.purchase_weight, invoice.ts, history)
        profile["purchased"].extend([invoice.ts, item] for item in invoice.items)
    return counts, profiles


def _history(
    purchased: list[list], ts: float, settings: CoSettings, skip: set[str]
) -> list[tuple[float, str, float]]:
    out: list[tuple[float, str, float]] = []
    seen = set(skip)
    horizon = ts - settings.history_window_s
    for then, item in reversed(purchased):
        if then < horizon or len(out) >= settings.history_items:
            break
        if item not in seen:
            seen.add(item)
            out.append((then, item, settings.purchase_weight))
    return out


def evaluate(
    invoices: list[Invoice],
    *,
    k: int = 10,
    test_days: float = 90.0,
    co: CoSettings | None = None,
    rank: RankSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Result:
    """Hit rate@k and NDCG@k of collaborative filtering and of popularity on a time split."""
    co = co or CoSettings()
    rank = rank or RankSettings()
    buying = [i for i in invoices if i.items]
    if not buying:
        raise ValueError("no purchases in the data")
    cutoff = buying[-1].ts - test_days * DAY
    before = [i for i in invoices if i.ts < cutoff]
    counts, profiles = train(before, co)
    truth: dict[str, set[str]] = {}
    for invoice in buying:
        if invoice.ts >= cutoff and invoice.customer not in truth:
            truth[invoice.customer] = set(invoice.items)
    tested = [c for c in truth if profiles.get(c, {}).get("purchased")]
    # the baseline: products in the most training orders
    orders_with: dict[str, int] = {}
    for invoice in before:
        for item in invoice.items:
            orders_with[item] = orders_with.get(item, 0) + 1
    by_orders = sorted(orders_with.items(), key=lambda kv: (-kv[1], kv[0]))
    popular_stream = [(item, float(n), "popular") for item, n in by_orders[: k * 20]]
    fallback = [(item, w, "popular") for item, w in counts.top_popular("", k * 20)]
    hits = base_hits = recent_hits = 0
    gain = base_gain = recent_gain = 0.0
    neighbors_cache: dict[str, list[tuple[str, float]]] = {}
    for n, customer in enumerate(tested, start=1):
        profile = profiles[customer]
        seeds = seeds_of(profile, cutoff, co, rank)
        for seed in seeds:
            if seed not in neighbors_cache:
                neighbors_cache[seed] = counts.neighbors(seed, 50)
        exclude = excluded(profile, cutoff, rank)
        got = recommend(
            seeds,
            neighbors_cache,
            counts.mass,
            fallback,
            limit=k,
            exclude=exclude,
            settings=rank,
        )
        base = recommend({}, {}, {}, popular_stream, limit=k, exclude=exclude, settings=rank)
        recent = recommend({}, {}, {}, fallback, limit=k, exclude=exclude, settings=rank)
        wanted = truth[customer]
        ranked = [r["product_id"] for r in got]
        base_ranked = [r["product_id"] for r in base]
        recent_ranked = [r["product_id"] for r in recent]
        recent_hits += any(item in wanted for item in recent_ranked)
        recent_gain += ndcg_at(recent_ranked, wanted, k)
        hits += any(item in wanted for item in ranked)
        base_hits += any(item in wanted for item in base_ranked)
        gain += ndcg_at(ranked, wanted, k)
        base_gain += ndcg_at(base_ranked, wanted, k)
        if progress is not None:
            progress(n, len(tested))
    total = max(len(tested), 1)
    return Result(
        customers=len(tested),
        hit_rate=hits / total,
        ndcg=gain / total,
        baseline_hit_rate=base_hits / total,
        baseline_ndcg=base_gain / total,
        recent_hit_rate=recent_hits / total,
        recent_ndcg=recent_gain / total,
        train_invoices=len(before),
        cutoff=cutoff,
        k=k,
    )


def _progress(n: int, total: int) -> None:
    if n == total or n % 200 == 0:
        print(f"\rnudge recs evaluate: {n}/{total} customers", end="", file=sys.stderr)
        if n == total:
            print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`nudge recs evaluate --data FILE [--k 10] [--test-days 90]`."""
    parser = argparse.ArgumentParser(prog="nudge recs", description="recommendations")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="hit rate@K and NDCG@K on a time split of transactions")
    ev.add_argument("--data", required=True, help="transactions CSV (Online Retail layout)")
    ev.add_argument("--k", type=int, default=10)
    ev.add_argument("--test-days", type=float, default=90.0, help="the last N days are the test")
    ev.add_argument("--config", help="config.toml whose [recs] settings to use")
    args = parser.parse_args(argv)
    from engine.config import load
    from engine.recs.settings import co_settings, rank_settings

    config = load(args.config)
    started = time.monotonic()
    invoices = read_invoices(args.data)
    result = evaluate(
        invoices,
        k=args.k,
        test_days=args.test_days,
        co=co_settings(config.recs),
        rank=rank_settings(config.recs),
        progress=_progress,
    )
    k = result.k
    cutoff = time.strftime("%Y-%m-%d", time.gmtime(result.cutoff))
    print(f"train: {result.train_invoices} invoices before {cutoff}")
    print(f"test:  {result.customers} customers' next purchase after it")
    print(f"{'':28}{'hit rate@' + str(k):>14}{'NDCG@' + str(k):>10}")
    # "its fallback alone": popularity with the same forward decay, no co-occurrence
    rows = [
        ("item-to-item CF (served)", result.hit_rate, result.ndcg),
        ("baseline: popularity", result.baseline_hit_rate, result.baseline_ndcg),
        ("its fallback alone", result.recent_hit_rate, result.recent_ndcg),
    ]
    for label, hit, gain in rows:
        print(f"{label:28}{hit:>14.4f}{gain:>10.4f}")
    ratio = result.hit_rate / result.baseline_hit_rate if result.baseline_hit_rate else math.inf
    print(f"CF / popularity hit rate: {ratio:.2f}x  ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

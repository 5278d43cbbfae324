"""What recommendations, RFM and model scoring add to the shard's cost per event.

    python -m benchmarks.insight [--events 30000] [--customers 2000] [--runs 5]
                                 [--data ../shared/data/online_retail_sample.csv]

The same storefront traffic as benchmarks.rules (views, adds, orders, email)
goes through the shard's real hot path, `Partition.apply`, with the starter
rules: first without insight (the baseline, measured in the same run), then
with co-occurrence counting, RFM, both, and both plus a churn model scoring
the queued customers in one batch every 1,000 events (what the shard does
every `score_interval_ms`). Every 1,000 events the RFM population is also
merged as a flush would (scores are taken against the merged population).
CPU time (time.process_time), best of `runs`, the cases taken in turn.

With `--data`, the transactions' co-occurrence counts are flushed into an
embedded Redis as the shards would, and the `recommendations` block's
recommender is timed per call (wall time, p50 and p99) beside the interim
recent-interest recommender it replaced, which reads nothing but the profile.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable

from benchmarks.rules import traffic
from engine.insight.features import FEATURES
from engine.insight.live import LiveInsight
from engine.insight.model import Model
from engine.insight.rfm import Population
from engine.partition import Partition
from engine.recs.cooccur import CoSettings
from engine.rules import RuleSet
from engine.rules.files import STARTER


def churn_model() -> Model:
    """A real HistGradientBoosting model over the real feature schema."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = random.Random(3)
    rows = [[rng.uniform(0, 50) for _ in FEATURES] for _ in range(2000)]
    labels = [1 if row[0] > 25 else 0 for row in rows]
    estimator = HistGradientBoostingClassifier(max_iter=150, max_depth=3, random_state=0)
    return Model("churn", 1, 0.5, estimator.fit(rows, labels))


def run(events: list[dict], make: Callable[[], Partition], score_every: int, models: dict) -> tuple:
    """(µs per event, scoring seconds, customers scored) for one pass on a fresh partition."""
    partition = make()
    apply = partition.apply
    gc.collect()
    gc.disable()
    scoring = 0.0
    scored = 0
    started = time.process_time()
    insight = partition.insight
    for n, event in enumerate(events, start=1):
        apply(event)
        if insight is not None and insight.rfm and n % 1000 == 0:  # the flush's merge
            insight.merged = Population.from_dict(insight.population.to_dict())
        if score_every and n % score_every == 0:
            t = time.process_time()
            scored += partition.score(models, event["ts"])
            scoring += time.process_time() - t
    elapsed = time.process_time() - started
    gc.enable()
    return elapsed / len(events) * 1e6, scoring, scored


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def bench_recommender(data: str, calls: int = 1000) -> None:
    """p50/p99 of one CF recommendation from Redis, beside the interim recommender."""
    import asyncio
    import tempfile

    from engine.content.recommend import recent_interest
    from engine.insight.retail import read_invoices
    from engine.recs.evaluate import train
    from engine.recs.recommender import CollaborativeRecommender
    from engine.recs.store import RecsStore
    from engine.redis_server import EmbeddedRedis
    from engine.store import connect

    invoices = read_invoices(data)
    counts, profiles = train(invoices, CoSettings())
    customers = [p for p in profiles.values() if p["purchased"]][:calls]
    now = invoices[-1].ts

    class Clock:
        def now(self) -> float:
            return now

    async def run(url: str) -> tuple[list[float], list[float], int]:
        store = RecsStore(connect(url))
        await store.flush(counts, {}, keep_neighbors=200)
        recommender = CollaborativeRecommender(url, clock=Clock())
        cf, interim, filled = [], [], 0
        for profile in customers:
            started = time.perf_counter()
            items = await recommender.recommend(profile, limit=4)
            cf.append(time.perf_counter() - started)
            filled += len(items) == 4
            started = time.perf_counter()
            recent_interest(profile, limit=4)
            interim.append(time.perf_counter() - started)
        await recommender.close()
        await store.close()
        return cf, interim, filled

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(tmp)
        url = server.start()
        try:
            cf, interim, filled = asyncio.run(run(url))
        finally:
            server.stop()
    print(f"recommendations block, {len(cf):,} customers of {data}, 4 items each")
    for label, times in (
        ("item-to-item CF, three Redis round trips", cf),
        ("baseline: interim recent-interest (no I/O)", interim),
    ):
        p50, p99 = _percentile(times, 0.5) * 1000, _percentile(times, 0.99) * 1000
        print(f"  {label:<54} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms")
    print(f"  lists with all 4 items: {filled / len(cf):.0%} (CF)")


def main(argv: list[str] | None = None) -> int:
    """Run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", help="a transactions CSV: also time the recommender on Redis")
    args = parser.parse_args(argv)
    events = traffic(args.events, args.customers)
    text = STARTER.read_text()
    model = churn_model()

    def partition(**insight: object) -> Callable[[], Partition]:
        def make() -> Partition:
            rules = RuleSet.from_toml(text, source="starter.toml")
            live = LiveInsight(**insight) if insight else None
            return Partition(lambda c: True, rules=rules, insight=live)

        return make

    cases = [
        ("starter rules, no insight (baseline)", partition(), 0),
        ("+ co-occurrence counting", partition(co=CoSettings(), rfm=False), 0),
        ("+ RFM", partition(co=None, rfm=True), 0),
        ("+ co-occurrence and RFM (the default)", partition(co=CoSettings(), rfm=True), 0),
        (
            "+ both, and a churn model scored every 1,000 events",
            partition(co=CoSettings(), rfm=True, models=True),
            1000,
        ),
    ]
    print(f"shard hot path (Partition.apply), {args.events:,} events, {args.customers:,} customers")
    # round robin over the cases, best of `runs` each: drift on a busy machine hits all alike
    best: dict[str, tuple] = {}
    for _ in range(args.runs):
        for label, make, every in cases:
            got = run(events, make, every, {"churn": model})
            if label not in best or got[0] < best[label][0]:
                best[label] = got
    base = None
    for label, _make, _every in cases:
        us, scoring, scored = best[label]
        base = us if base is None else base
        note = "" if us == base else f"+{us - base:5.2f} µs ({us / base:4.2f}x baseline)"
        print(f"  {label:<54} {us:7.2f} µs/event  {note}")
        if scored:
            print(
                f"  {'  of which batch scoring':<54} {scoring / len(events) * 1e6:7.2f} µs/event"
                f"  ({scored:,} customers scored, {scoring / scored * 1e6:.1f} µs each)"
            )
    if args.data:
        bench_recommender(args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

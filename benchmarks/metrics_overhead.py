"""What counting costs on the hot paths, beside what the hot path costs anyway.

Run:  python -m benchmarks.metrics_overhead

1. Shard: applying shopper events to a Partition with the starter rules, alone (the
   baseline) and with the funnel check ShardActor._apply adds per event.
2. API: counting one 100-event ingest request (engine.metrics.process.count_ingest)
   beside normalizing the same request (engine.events.normalize_batch), the work
   every request does anyway.
Figures are per event, best of 5 rounds, measured in this run.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from benchmarks.shoppers import ShopperModel
from engine.config import load
from engine.events import normalize_batch
from engine.metrics import process
from engine.metrics.shard import ShardMetrics
from engine.partition import APPLIED, Partition
from engine.rules import RuleSet


def _events(n: int) -> list[dict]:
    model = ShopperModel(seed=5)
    messages: list[dict] = []
    while len(messages) < n:
        messages += model.session().messages
    stamp = datetime.now(UTC).isoformat()
    batch = [{**m, "messageId": f"m{i}", "timestamp": stamp} for i, m in enumerate(messages[:n])]
    events, _ = normalize_batch({"batch": batch}, received_at=time.time(), body_bytes=0)
    return events


def _best(fn, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    """Print the figures."""
    rules = RuleSet.from_sources(load("config.toml", env={}).rules)
    events = _events(20_000)
    meters = ShardMetrics(0)

    def plain() -> None:
        part = Partition(lambda _c: True, rules=rules)
        for e in events:
            part.apply(e)

    def counted() -> None:
        part = Partition(lambda _c: True, rules=rules)
        apply, watched, funnel = part.apply, meters.watched, meters.funnel
        for e in events:
            if apply(e) == APPLIED and e.get("event") in watched:
                funnel.on_event(e)

    base = _best(plain) / len(events)
    with_funnel = _best(counted) / len(events)
    print(f"shard, per event: apply with starter rules {base * 1e6:.2f} us (baseline); "
          f"with the funnel check {with_funnel * 1e6:.2f} us "
          f"(+{(with_funnel - base) * 1e6:.2f} us, {with_funnel / base:.3f}x)")  # fmt: skip

    raw = [{**{k: v for k, v in e.items() if k not in ("customer", "ts", "receivedAt")},
            "timestamp": "2026-01-01T00:00:00Z"} for e in events[:100]]  # fmt: skip
    requests = 2000

    def normalize() -> None:
        for _ in range(requests):
            normalize_batch({"batch": raw}, received_at=time.time(), body_bytes=0)

    accepted, _ = normalize_batch({"batch": raw}, received_at=time.time(), body_bytes=0)

    def count() -> None:
        for _ in range(requests):
            process.count_ingest(accepted, (), 0.001)

    norm = _best(normalize) / (requests * 100)
    cnt = _best(count) / (requests * 100)
    print(f"API, per event: normalize_batch {norm * 1e6:.2f} us (baseline); "
          f"count_ingest {cnt * 1e6:.3f} us ({cnt / norm:.3f}x of normalizing)")  # fmt: skip


if __name__ == "__main__":
    main()

"""One scrape: the API processes' metrics, every actor's snapshot, stream depths from Redis.

Shards are asked through the ShardClient (one call per shard, at scrape time),
so counting costs the hot path nothing but dict increments. With several uvicorn
workers, the API processes' values come from PROMETHEUS_MULTIPROC_DIR, so any
worker answers for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from engine.metrics import process
from engine.metrics.actor import by_actor, families, merge
from engine.routing import shard_tag, stream_key
from engine.store import outbox_key, parse_id

log = logging.getLogger(__name__)

ActorSource = Callable[[], Awaitable[list[list[dict] | None]]]
# metric name, help, and a function from the shard count to {label value: stream key}
StreamDepth = tuple[str, str, str, Callable[[int], dict[str, str]]]


@dataclass
class Scrape:
    """Everything one scrape gathered, before it is rendered.

    `actors` sums the actors' snapshots (the console reads it); `exposed` is what
    /metrics shows: each actor's series under its own `shard` or `dispatcher`
    label. A sum of actors with no such label dipped whenever one actor missed a
    scrape or restarted, and Prometheus read the dip as a counter reset (rate()
    and increase() then counted everything left as new).
    """

    at: float
    actors: dict[str, dict]
    gauges: list[GaugeMetricFamily] = field(default_factory=list)
    shards_answered: int = 0
    exposed: dict[str, dict] | None = None


SENDS = "nudge_sends_total"
SENDS_HELP = (
    "Sends by rule, variant and delivery outcome (sent, suppressed, holdout, dead_lettered, "
    "failed attempts, replayed), from the delivery ledger's counters in Redis"
)


def _delivery_counts(replies: list[dict]) -> dict[tuple, float]:
    """The delivery ledger's per-shard counters (engine.delivery.ledger: nudge:{sN}:dcounts,
    field "rule\\x1fvariant\\x1foutcome"), summed over shards."""
    out: dict[tuple, float] = {}
    for reply in replies:
        for name, value in (reply or {}).items():
            parts = (name.decode() if isinstance(name, bytes) else name).split("\x1f")
            if len(parts) != 3:
                continue
            key = (parts[0], parts[1] or "-", parts[2])
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _scrape_gauges(shards: int, answered: int) -> list[tuple[str, str, float]]:
    return [
        ("nudge_shards", "Shards the engine is configured with", shards),
        ("nudge_shards_answered", "Shards that answered this scrape in time", answered),
    ]


_LAG_SERIES = "nudge_stream_lag_seconds"


def known_series(collector: MetricsCollector | None = None) -> dict[str, str]:
    """Every series name /metrics can hold (as exposed: _total, _bucket...), with its help.

    Built from the definitions, so dashboards and alerts can be checked against it.
    """
    from engine.metrics.delivery import DeliveryMetrics
    from engine.metrics.shard import ShardMetrics

    out: dict[str, str] = {}

    def add(name: str, kind: str, help: str) -> None:
        if kind == "counter":
            out[name if name.endswith("_total") else name + "_total"] = help
        elif kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                out[name + suffix] = help
        else:
            out[name] = help

    for family in process.REGISTRY.collect():
        add(family.name, family.type, family.documentation)
    for actor in (ShardMetrics(0).registry, DeliveryMetrics().registry):
        for metric in actor.snapshot():
            add(metric["name"], metric["kind"], metric["help"])
    collector = collector or MetricsCollector(shards=None, store=None, shard_count=1)
    for name, help, _label, _keys in collector.stream_depths:
        add(name, "gauge", help)
    for name, help, _ in _scrape_gauges(0, 0):
        add(name, "gauge", help)
    add(SENDS, "counter", SENDS_HELP)
    add(_LAG_SERIES, "gauge", "Stream lag per shard")
    return out


class _Static:
    def __init__(self, metrics: list[Any]):
        self._metrics = metrics

    def collect(self) -> list[Any]:
        return self._metrics


class MetricsCollector:
    """Gathers and renders /metrics; `add_actor_source` and `add_stream_depth` extend it."""

    def __init__(
        self,
        *,
        shards: Callable[[], Any],
        store: Callable[[], Any],
        shard_count: int,
        multiproc_dir: str | None = None,
        timeout_s: float = 2.0,
    ):
        self._shards = shards
        self._store = store
        self.shard_count = shard_count
        self.multiproc_dir = multiproc_dir
        self.timeout_s = timeout_s
        self.actor_sources: list[ActorSource] = [self._shard_snapshots]
        self.actor_labels: list[str] = ["shard"]  # each source's actors, by this label
        self.stream_depths: list[StreamDepth] = [
            (
                "nudge_outbox_length",
                "Entries in a shard's outbox stream of decided sends",
                "shard",
                lambda n: {str(i): outbox_key(i) for i in range(n)},
            ),
            (
                # The delivery dispatchers' dead letters (engine.delivery.ledger.dlq_key).
                "nudge_dlq_depth",
                "Sends parked in a shard's dead-letter stream after every attempt failed",
                "shard",
                lambda n: {str(i): f"nudge:{shard_tag(i)}:dlq" for i in range(n)},
            ),
            (
                "nudge_stream_length",
                "Entries in a shard's event stream (trimmed below its checkpoint)",
                "shard",
                lambda n: {str(i): stream_key(i) for i in range(n)},
            ),
        ]

    def add_actor_source(self, source: ActorSource, *, label: str) -> None:
        """Also collect these actors' snapshots (e.g. the dispatchers' DeliveryMetrics),
        each actor's series under `label` = its place in the list (e.g. dispatcher)."""
        if label in self.actor_labels:
            raise ValueError(f"an actor source is labelled {label!r} already")
        self.actor_sources.append(source)
        self.actor_labels.append(label)

    def add_stream_depth(
        self, name: str, help: str, label: str, keys: Callable[[int], dict[str, str]]
    ) -> None:
        """Also report XLEN of these Redis streams as gauge `name` (e.g. nudge_dlq_depth)."""
        self.stream_depths.append((name, help, label, keys))

    async def _shard_snapshots(self) -> list[list[dict] | None]:
        client = self._shards()

        async def one(index: int) -> list[dict] | None:
            try:
                return await asyncio.wait_for(client.call(index, "metrics"), self.timeout_s)
            except Exception as exc:
                log.warning("metrics: shard %d did not answer: %r", index, exc)
                return None

        return list(await asyncio.gather(*(one(i) for i in range(client.shards))))

    async def gather(self) -> Scrape:
        """Ask every actor source and Redis, in parallel."""
        results = await asyncio.gather(
            *(source() for source in self.actor_sources), self._redis_gauges(),
            return_exceptions=True,
        )  # fmt: skip
        *actor_results, redis_result = results
        snapshots: list[list[dict] | None] = []
        labeled: list[list[dict]] = []
        shard_replies: list[list[dict] | None] = []
        for i, result in enumerate(actor_results):
            if isinstance(result, BaseException):
                log.warning("metrics: an actor source failed: %r", result)
                continue
            snapshots.extend(result)
            if i == 0:
                shard_replies = result
            label = self.actor_labels[i]
            labeled += [by_actor(s, label, str(n)) for n, s in enumerate(result) if s]
        actors = merge(s for s in snapshots if s)
        scrape = Scrape(time.time(), actors, shards_answered=sum(1 for s in shard_replies if s))
        scrape.exposed = merge(labeled)
        if isinstance(redis_result, BaseException):
            log.warning("metrics: Redis gauges failed: %r", redis_result)
        else:
            scrape.gauges.extend(self._lag(actors, redis_result.pop("_tails")))
            actors[SENDS] = scrape.exposed[SENDS] = {
                "name": SENDS,
                "help": SENDS_HELP,
                "kind": "counter",
                "labels": ["rule", "variant", "outcome"],
                "samples": redis_result.pop("_sends"),
            }
            for name, (help, label, values) in redis_result.items():
                family = GaugeMetricFamily(name, help, labels=[label])
                for key, value in values.items():
                    family.add_metric([key], value)
                scrape.gauges.append(family)
        for name, help, value in _scrape_gauges(self.shard_count, scrape.shards_answered):
            family = GaugeMetricFamily(name, help)
            family.add_metric([], value)
            scrape.gauges.append(family)
        return scrape

    async def _redis_gauges(self) -> dict[str, Any]:
        store = self._store()
        tails = await store.tails()
        plan = []
        async with store.redis.pipeline(transaction=False) as pipe:
            for name, help, label, keys in self.stream_depths:
                for value, key in keys(self.shard_count).items():
                    plan.append((name, help, label, value))
                    pipe.xlen(key)
            for index in range(self.shard_count):
                pipe.hgetall(f"nudge:{shard_tag(index)}:dcounts")
            replies = await pipe.execute()
        lengths, counts = replies[: len(plan)], replies[len(plan) :]
        out: dict[str, Any] = {"_tails": tails, "_sends": _delivery_counts(counts)}
        for (name, help, label, value), length in zip(plan, lengths, strict=True):
            out.setdefault(name, (help, label, {}))[2][value] = float(length)
        return out

    def _lag(self, actors: dict[str, dict], tails: dict[int, str]) -> list[GaugeMetricFamily]:
        # Stream ids start with the milliseconds they were written at, so the newest
        # entry's time minus the last applied entry's time is how far behind a shard is.
        positions = actors.get("nudge_stream_position_ms", {}).get("samples", {})
        family = GaugeMetricFamily(
            _LAG_SERIES,
            "Age of the newest event a shard has not applied yet relative to its last applied one",
            labels=["shard"],
        )
        for index, tail in tails.items():
            pos = positions.get((str(index),))
            if pos is None:
                continue
            family.add_metric([str(index)], max(parse_id(tail)[0] - pos, 0) / 1000.0)
        return [family]

    def registry(self, scrape: Scrape) -> CollectorRegistry:
        """A registry holding everything in `scrape` plus the API processes' metrics."""
        registry = CollectorRegistry(auto_describe=False)
        if self.multiproc_dir:
            MultiProcessCollector(registry, path=self.multiproc_dir)
        else:
            registry.register(_Static(list(process.REGISTRY.collect())))
        exposed = scrape.exposed if scrape.exposed is not None else scrape.actors
        registry.register(_Static(families(exposed) + scrape.gauges))
        return registry

    async def text(self) -> bytes:
        """The Prometheus text exposition of one fresh scrape."""
        return generate_latest(self.registry(await self.gather()))

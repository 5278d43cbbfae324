"""Metrics counted in the API processes (prometheus_client objects, defined once).

With several uvicorn workers, `nudge serve` sets PROMETHEUS_MULTIPROC_DIR before
the workers start, and prometheus_client writes these values to files there that
every worker's /metrics adds up. Other modules count with one line, e.g.

    from engine.metrics import process as m
    m.EMAIL_OPENS.labels(rule=token.rule or "-", variant=token.variant or "-").inc()
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# Seconds; content answers live in the 1-200 ms range, so the buckets do too.
CONTENT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.19, 0.2, 0.25, 0.5, 1.0,
    2.5,
)  # fmt: skip
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

INGEST_EVENTS = Counter(
    "nudge_ingest_events_total",
    "Events received by the ingest API, by Segment type and outcome (accepted or rejected)",
    ["type", "outcome"],
    registry=REGISTRY,
)
INGEST_REJECTS = Counter(
    "nudge_ingest_rejects_total",
    "Rejected ingest requests and batch messages, by error code",
    ["reason"],
    registry=REGISTRY,
)
INGEST_SECONDS = Histogram(
    "nudge_ingest_seconds",
    "Ingest request latency, from receipt to durable in Redis",
    buckets=INGEST_BUCKETS,
    registry=REGISTRY,
)
CONTENT_REQUESTS = Counter(
    "nudge_content_requests_total",
    "Content requests by HTTP status",
    ["status"],
    registry=REGISTRY,
)
CONTENT_SECONDS = Histogram(
    "nudge_content_seconds",
    "Content answer latency (whole answer, server side)",
    buckets=CONTENT_BUCKETS,
    registry=REGISTRY,
)
CONTENT_BLOCK_SECONDS = Histogram(
    "nudge_content_block_seconds",
    "Time until each content block had its value, by block and where the value came from",
    ["block", "source"],
    buckets=CONTENT_BUCKETS,
    registry=REGISTRY,
)
CONTENT_FALLBACKS = Counter(
    "nudge_content_fallbacks_total",
    "Content blocks answered with their fallback (or omitted), by block and reason",
    ["block", "reason"],
    registry=REGISTRY,
)
CONTENT_CACHE = Counter(
    "nudge_content_cache_total",
    "Content source cache lookups by result (local_hit, shared_hit, miss, stale_served, "
    "coalesced, upstream, upstream_failed, refresh)",
    ["result"],
    registry=REGISTRY,
)
# Counted by the tracking endpoints (open pixel, click redirect, unsubscribe link).
EMAIL_OPENS = Counter(
    "nudge_email_opens_total",
    "Email opens recorded by the open pixel, by rule and variant",
    ["rule", "variant"],
    registry=REGISTRY,
)
EMAIL_CLICKS = Counter(
    "nudge_email_clicks_total",
    "Email link clicks recorded by the click redirect, by rule and variant",
    ["rule", "variant"],
    registry=REGISTRY,
)
UNSUBSCRIBES = Counter(
    "nudge_unsubscribes_total",
    "Unsubscribes through the email's link",
    registry=REGISTRY,
)


def count_ingest(accepted: Iterable[dict], rejected: Iterable[dict], seconds: float) -> None:
    """One ingest request stored: its events by type, its rejected messages by code."""
    for kind, n in _Tally(e["type"] for e in accepted).items():
        INGEST_EVENTS.labels(kind, "accepted").inc(n)
    reasons = _Tally(r.get("code", "invalid") for r in rejected)
    if reasons:
        INGEST_EVENTS.labels("unknown", "rejected").inc(sum(reasons.values()))
        for reason, n in reasons.items():
            INGEST_REJECTS.labels(reason).inc(n)
    INGEST_SECONDS.observe(seconds)


def count_ingest_refused(reason: str, messages: int = 1) -> None:
    """A whole ingest request refused (bad key, bad JSON, too large, all messages invalid)."""
    INGEST_REJECTS.labels(reason).inc(messages)
    INGEST_EVENTS.labels("unknown", "rejected").inc(messages)


class CacheTally:
    """Turns a cache's running `stats` Counter into increments of CONTENT_CACHE."""

    def __init__(self) -> None:
        self._seen: _Tally[str] = _Tally()

    def sync(self, stats: _Tally[str]) -> None:
        """Count what `stats` gained since the last call."""
        for result, total in stats.items():
            delta = total - self._seen[result]
            if delta > 0:
                CONTENT_CACHE.labels(result).inc(delta)
                self._seen[result] = total


def count_content(answer: object, seconds: float, status: int) -> None:
    """One content answer: its latency, each block's latency and source, its fallbacks."""
    CONTENT_REQUESTS.labels(str(status)).inc()
    CONTENT_SECONDS.observe(seconds)
    if answer is None:
        return
    timings = getattr(answer, "timings", {}) or {}
    for block in answer.blocks:
        CONTENT_BLOCK_SECONDS.labels(block.name, block.source).observe(
            timings.get(block.name, seconds)
        )
        if block.fallback:
            CONTENT_FALLBACKS.labels(block.name, block.reason or "unknown").inc()
    for name in answer.omitted:
        CONTENT_FALLBACKS.labels(name, "omitted").inc()


class ContentObserver:
    """What the content route calls after each request: counts it and the cache's gains."""

    def __init__(self, service: object):
        self._service = service
        self._cache = CacheTally()

    def __call__(self, answer: object, seconds: float, status: int) -> None:
        count_content(answer, seconds, status)
        self._cache.sync(self._service.cache.stats)

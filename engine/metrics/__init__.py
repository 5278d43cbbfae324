"""Metrics: Prometheus /metrics, counted where things happen and collected at scrape time.

Public:
  engine.metrics.process    prometheus_client objects of the API processes (ingest, content,
                            tracking): `process.EMAIL_OPENS.labels(rule=..., variant=...).inc()`
  ActorMetrics              counters/gauges/histograms inside Ray actors, reported as snapshots
  DeliveryMetrics           the dispatchers' metrics (sends, event-to-ESP latency, ESP requests)
  ShardMetrics, Funnel      what a shard counts (checkpoints, triggers, the per-rule funnel)
  MetricsCollector          one scrape: API processes + actor snapshots + stream depths
  metrics_routes            GET /metrics
  two_proportion_z          significance of A/B results
Every metric name and what it means: docs/metrics.md.
"""

from __future__ import annotations

from engine.metrics.actor import ActorMetrics, families, merge
from engine.metrics.delivery import DeliveryMetrics
from engine.metrics.funnel import Funnel
from engine.metrics.hist import Buckets, quantile
from engine.metrics.shard import ShardMetrics
from engine.metrics.stats import two_proportion_z

__all__ = [
    "ActorMetrics",
    "Buckets",
    "DeliveryMetrics",
    "Funnel",
    "ShardMetrics",
    "families",
    "merge",
    "quantile",
    "two_proportion_z",
]

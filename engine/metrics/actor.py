"""Metrics kept inside actors (shards, dispatchers) and reported as plain snapshots.

An actor holds an `ActorMetrics`, counts into it (a dict increment: nothing on the
hot path touches files or locks), and answers `snapshot()` from a Ray method. The
API collects every actor's snapshot at scrape time and turns them into Prometheus
families with `families()`; snapshots of the same metric from several actors add up.

    metrics = ActorMetrics()
    sends = metrics.counter("nudge_sends_total", "Sends by outcome", ("rule", "variant", "outcome"))
    sends.inc(("cart_abandonment", "urgency", "sent"))
    latency = metrics.histogram("nudge_send_seconds", "Event to ESP", ())
    latency.observe((), 0.42)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from engine.metrics.hist import LATENCY_BOUNDS, Buckets, add_snapshots, cumulative

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


class Family:
    """One named metric with labels; values keyed by the tuple of label values."""

    __slots__ = ("bounds", "help", "kind", "labels", "name", "values")

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        kind: str,
        bounds: Sequence[float] = LATENCY_BOUNDS,
    ):
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self.kind = kind
        self.bounds = tuple(bounds)
        self.values: dict[tuple, Any] = {}

    def inc(self, key: tuple = (), amount: float = 1.0) -> None:
        """Add `amount` to the counter (or gauge) with label values `key`."""
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def set(self, key: tuple, value: float) -> None:
        """Set a gauge."""
        self.values[key] = value

    def observe(self, key: tuple, value: float) -> None:
        """Count one observation in the histogram with label values `key`."""
        hist = self.values.get(key)
        if hist is None:
            hist = self.values[key] = Buckets(self.bounds)
        hist.observe(value)

    def snapshot(self) -> dict:
        """Plain, picklable data."""
        if self.kind == HISTOGRAM:
            samples = {k: h.snapshot() for k, h in self.values.items()}
        else:
            samples = dict(self.values)
        return {
            "name": self.name,
            "help": self.help,
            "kind": self.kind,
            "labels": list(self.labels),
            "samples": samples,
        }


class ActorMetrics:
    """The metrics of one actor; `snapshot()` is what it reports."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def _add(self, family: Family) -> Family:
        existing = self._families.get(family.name)
        if existing is not None:
            if existing.kind != family.kind or existing.labels != family.labels:
                raise ValueError(f"metric {family.name} defined twice differently")
            return existing
        self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Family:
        """A counter (only goes up while the actor lives)."""
        return self._add(Family(name, help, labels, COUNTER))

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Family:
        """A gauge (a current value)."""
        return self._add(Family(name, help, labels, GAUGE))

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        bounds: Sequence[float] = LATENCY_BOUNDS,
    ) -> Family:
        """A histogram with the given bucket bounds."""
        return self._add(Family(name, help, labels, HISTOGRAM, bounds))

    def snapshot(self) -> list[dict]:
        """Every metric as plain data."""
        return [f.snapshot() for f in self._families.values()]


def merge(snapshots: Iterable[list[dict]]) -> dict[str, dict]:
    """Snapshots of several actors as one: same name and labels add up.

    One name with different label lists (two actor sources labelled apart, see
    by_actor) gets the union of them, a label a series lacks being "" (which
    Prometheus reads as absent): the series stay apart instead of one source's
    being read under the other's labels.
    """
    out: dict[str, dict] = {}
    for snapshot in snapshots:
        for metric in snapshot or ():
            into = out.get(metric["name"])
            if into is None:
                out[metric["name"]] = {**metric, "samples": dict(metric["samples"])}
                continue
            if list(metric["labels"]) != list(into["labels"]):
                old, new = list(into["labels"]), list(metric["labels"])
                union = [*old, *(name for name in new if name not in old)]
                into["samples"] = _relabel(into["samples"], old, union)
                into["labels"] = union
                samples = _relabel(metric["samples"], new, union)
                metric = {**metric, "labels": union, "samples": samples}
            samples = into["samples"]
            for key, value in metric["samples"].items():
                key = tuple(key)
                if key not in samples:
                    samples[key] = value
                elif metric["kind"] == HISTOGRAM:
                    samples[key] = add_snapshots(samples[key], value)
                else:
                    samples[key] = samples[key] + value
    return out


def _relabel(samples: dict, labels: list[str], union: list[str]) -> dict:
    """Sample keys in `labels` order, as keys in `union` order ("" where missing)."""
    where = [labels.index(name) if name in labels else None for name in union]
    return {
        tuple("" if i is None else key[i] for i in where): value for key, value in samples.items()
    }


def by_actor(snapshot: list[dict], label: str, value: str) -> list[dict]:
    """`snapshot` with `label`=`value` on every metric that has no such label yet."""
    out = []
    for metric in snapshot:
        if label in metric["labels"]:
            out.append(metric)
            continue
        samples = {(value, *key): v for key, v in metric["samples"].items()}
        out.append({**metric, "labels": [label, *metric["labels"]], "samples": samples})
    return out


def families(merged: dict[str, dict]) -> list[Any]:
    """Prometheus metric families for a merged snapshot (for a collector's collect())."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    out = []
    for metric in merged.values():
        labels = metric["labels"]
        kind = metric["kind"]
        if kind == COUNTER:
            name = metric["name"].removesuffix("_total")
            family = CounterMetricFamily(name, metric["help"], labels=labels)
            for key, value in metric["samples"].items():
                family.add_metric([str(v) for v in key], value)
        elif kind == GAUGE:
            family = GaugeMetricFamily(metric["name"], metric["help"], labels=labels)
            for key, value in metric["samples"].items():
                family.add_metric([str(v) for v in key], value)
        else:
            family = HistogramMetricFamily(metric["name"], metric["help"], labels=labels)
            for key, hist in metric["samples"].items():
                running = cumulative(hist["counts"])
                les = [_le(b) for b in hist["bounds"]] + ["+Inf"]
                family.add_metric(
                    [str(v) for v in key], list(zip(les, running, strict=True)), hist["sum"]
                )
        out.append(family)
    return out


def _le(bound: float) -> str:
    # Prometheus client libraries print bounds as floats ("0.25", "1.0").
    return repr(float(bound))

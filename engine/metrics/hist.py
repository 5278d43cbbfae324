"""Histograms as plain data, for actors that report metrics as snapshots (pure, no I/O)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Seconds: from a fast Redis round trip to a late timer.
LATENCY_BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip


class Buckets:
    """Counts of observations per bucket (not cumulative), plus their sum.

    >>> h = Buckets((0.1, 1.0)); h.observe(0.05); h.observe(3.0); h.counts
    [1, 0, 1]
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        """Plain data: bounds, per-bucket counts, sum."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


def add_snapshots(a: dict, b: dict) -> dict:
    """Two histogram snapshots with the same bounds added together."""
    if a["bounds"] != b["bounds"]:
        raise ValueError("histograms with different buckets cannot be added")
    counts = [x + y for x, y in zip(a["counts"], b["counts"], strict=True)]
    return {"bounds": a["bounds"], "counts": counts, "sum": a["sum"] + b["sum"]}


def cumulative(counts: Sequence[float]) -> list[float]:
    """Per-bucket counts as Prometheus' cumulative `le` counts."""
    out, total = [], 0.0
    for c in counts:
        total += c
        out.append(total)
    return out


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """The q-quantile estimated from per-bucket counts (linear within a bucket), as
    Prometheus' histogram_quantile does; None when there is no observation.

    >>> quantile((1.0, 2.0), [0, 10, 0], 0.5)
    1.5
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i >= len(bounds):  # in +Inf: the highest finite bound is all we know
                return float(bounds[-1]) if bounds else None
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * ((rank - seen) / c)
        seen += c
    return float(bounds[-1]) if bounds else None

"""Mergeable, deletable quantile sketches: counts per bucket (pure, stdlib only).

A population of customer values changes in place (a customer's order count
goes from 3 to 4), so the sketch must forget a value as well as learn one.
Bucket-count sketches do both exactly: `add` and `remove` move one count, and
two shards' sketches merge by adding counts bucket by bucket.

- `DDSketch`: logarithmic buckets with relative accuracy `alpha` (Masson,
  Rim and Lee, VLDB 2019): every value is known to within alpha of itself,
  whatever the spread. Used for order counts and revenue.
- `LinearSketch`: fixed-width buckets (one day for last-order dates, where
  relative accuracy on epoch seconds would mean months).

A rank is the share of the population strictly below a value (pandas'
rank(method="min", pct) minus one step), so customers with equal values
share a rank, and a big tie at the bottom (the many one-order customers)
stays in the bottom quintile instead of being lifted into the second.
"""

from __future__ import annotations

import bisect
import math
from typing import Any


class _BucketSketch:
    """Counts per integer bucket; subclasses map values to buckets."""

    kind = ""
    __slots__ = ("_index", "counts", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        # (sorted buckets, values below each): built on the first rank after a change, so
        # ranking against a population that changes only at merges is a binary search
        self._index: tuple[list[int], list[int]] | None = None

    def bucket(self, value: float) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def value_of(self, bucket: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def add(self, value: float, count: int = 1) -> None:
        """Learn `count` occurrences of `value`."""
        b = self.bucket(value)
        self.counts[b] = self.counts.get(b, 0) + count
        self.total += count
        self._index = None

    def remove(self, value: float, count: int = 1) -> None:
        """Forget `count` occurrences of `value` (never below zero)."""
        b = self.bucket(value)
        have = self.counts.get(b, 0)
        taken = min(have, count)
        if taken == have:
            self.counts.pop(b, None)
        else:
            self.counts[b] = have - taken
        self.total -= taken
        self._index = None

    def merge(self, other: _BucketSketch) -> None:
        """Add `other`'s counts into this sketch (same kind and parameters)."""
        if other.params() != self.params():
            raise ValueError(f"cannot merge {other.params()} into {self.params()}")
        counts = self.counts
        for b, n in other.counts.items():
            counts[b] = counts.get(b, 0) + n
        self.total += other.total
        self._index = None

    def rank(self, value: float) -> float:
        """The share of counted values in buckets below `value`'s, in [0, 1)."""
        if self.total <= 0:
            return 0.0
        index = self._index
        if index is None:
            buckets = sorted(self.counts)
            below, running = [], 0
            for b in buckets:
                below.append(running)
                running += self.counts[b]
            index = self._index = (buckets, below)
        buckets, below = index
        at = bisect.bisect_left(buckets, self.bucket(value))
        return (below[at] if at < len(buckets) else self.total) / self.total

    def quantile(self, q: float) -> float | None:
        """The value at quantile `q` (0..1), within the sketch's accuracy; None when empty."""
        if self.total <= 0:
            return None
        wanted = q * (self.total - 1)
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen > wanted:
                return self.value_of(b)
        return self.value_of(max(self.counts))

    def params(self) -> tuple:
        return (self.kind,)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for Redis): parameters and counts."""
        return {"kind": self.kind, "params": list(self.params()[1:]), "counts": self.counts}

    def __len__(self) -> int:
        return self.total


class DDSketch(_BucketSketch):
    """Log buckets: value v > 0 lands in ceil(log_gamma(v)); v <= `floor` in a zero bucket.

    Example: with alpha=0.01, 100 and 101 fall in different buckets, 100.0 and
    100.5 in the same one.
    """

    kind = "dd"
    __slots__ = ("_log_gamma", "alpha", "floor")
    _ZERO = -(2**31)  # below every real bucket

    def __init__(self, alpha: float = 0.01, *, floor: float = 1e-9):
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError("alpha must be between 0 and 1")
        self.alpha = alpha
        self.floor = floor
        self._log_gamma = math.log((1 + alpha) / (1 - alpha))

    def bucket(self, value: float) -> int:
        if value <= self.floor:
            return self._ZERO
        return math.ceil(math.log(value) / self._log_gamma)

    def value_of(self, bucket: int) -> float:
        if bucket == self._ZERO:
            return 0.0
        gamma = math.exp(self._log_gamma)
        return 2 * gamma**bucket / (gamma + 1)

    def params(self) -> tuple:
        return (self.kind, self.alpha, self.floor)


class LinearSketch(_BucketSketch):
    """Fixed-width buckets: value v lands in floor(v / width)."""

    kind = "linear"
    __slots__ = ("width",)

    def __init__(self, width: float = 86400.0):
        super().__init__()
        self.width = width

    def bucket(self, value: float) -> int:
        return math.floor(value / self.width)

    def value_of(self, bucket: int) -> float:
        return bucket * self.width

    def params(self) -> tuple:
        return (self.kind, self.width)


def sketch_from_dict(data: dict[str, Any]) -> DDSketch | LinearSketch:
    """Rebuild a sketch from `to_dict` output (bucket keys may come back as strings)."""
    kind = data.get("kind")
    params = data.get("params") or []
    if kind == "dd":
        sketch: DDSketch | LinearSketch = DDSketch(*params[:1], floor=params[1])
    elif kind == "linear":
        sketch = LinearSketch(*params)
    else:
        raise ValueError(f"unknown sketch kind {kind!r}")
    counts = {int(b): int(n) for b, n in (data.get("counts") or {}).items() if int(n) > 0}
    sketch.counts = counts
    sketch._index = None
    sketch.total = sum(counts.values())
    return sketch

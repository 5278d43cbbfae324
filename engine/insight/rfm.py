"""RFM: recency, frequency and monetary scores in quintiles, and the named segments.

Pure. A `Population` holds one shard's share of every buyer's values in three
mergeable sketches (last-order day, order count, revenue); shards publish
theirs and score against the merge of all of them, so a quintile means the
same on every shard. Scores are 1-5, 5 best (most recent, most frequent,
highest spend), from each value's percentile rank as pandas' rank(method=
"min", pct=True) gives it: with `below` buyers strictly below the value among
`n`, score = ceil(5 * (below + 1) / n). Ties share the lower rank.

Worked example (hand-computed in tests/insight/test_rfm.py): five buyers with
1, 1, 2, 3, 5 orders. Two buyers are below 2 orders: ceil(5 * 3/5) = 3;
nobody is below one order: ceil(5 * 1/5) = 1; 5 orders: ceil(5 * 5/5) = 5.
A lone buyer is 5 on every score.

The named segments follow the classic R x F grid (R first, then F):
    R 5, F 4-5: champions            R 3-4, F 4-5: loyal
    R 4-5, F 2-3: potential_loyalist R 5, F 1: new_customers
    R 4, F 1: promising              R 3, F 3: need_attention
    R 3, F 1-2: about_to_sleep       R 1-2, F 3-4: at_risk
    R 1-2, F 5: cant_lose            R 1-2, F 1-2: hibernating
"""

from __future__ import annotations

import math
from typing import Any

from engine.insight.sketch import DDSketch, LinearSketch, sketch_from_dict

DAY = 86400.0
SEGMENTS = (
    "champions",
    "loyal",
    "potential_loyalist",
    "new_customers",
    "promising",
    "need_attention",
    "about_to_sleep",
    "at_risk",
    "cant_lose",
    "hibernating",
)


def segment_of(r: int, f: int) -> str:
    """The classic RFM segment name of recency score `r` and frequency score `f`."""
    if r <= 2:
        return "cant_lose" if f == 5 else "at_risk" if f >= 3 else "hibernating"
    if r == 3:
        if f >= 4:
            return "loyal"
        return "need_attention" if f == 3 else "about_to_sleep"
    if f >= 4:
        return "champions" if r == 5 else "loyal"
    if f >= 2:
        return "potential_loyalist"
    return "new_customers" if r == 5 else "promising"


def quintile(below: float, total: int) -> int:
    """Score 1-5 from the share of `total` buyers strictly below a value."""
    if total <= 0:
        return 1
    return min(5, max(1, math.ceil(5 * (below * total + 1) / total - 1e-9)))


def values_of(profile: Any) -> tuple[float, float, float] | None:
    """(last-order time, orders, revenue) of a buyer; None for a customer with no order."""
    if not profile.orders or profile.last_order_at is None:
        return None
    return (profile.last_order_at, float(profile.orders), float(profile.revenue))


class Population:
    """One shard's buyers (or the merge of every shard's), in three sketches."""

    __slots__ = ("frequency", "monetary", "recency")

    def __init__(self, *, alpha: float = 0.01):
        self.recency = LinearSketch(DAY)  # of last-order times, one bucket per day
        self.frequency = DDSketch(alpha)
        self.monetary = DDSketch(alpha)

    def add(self, values: tuple[float, float, float]) -> None:
        """Count one buyer's values."""
        self.recency.add(values[0])
        self.frequency.add(values[1])
        self.monetary.add(values[2])

    def remove(self, values: tuple[float, float, float]) -> None:
        """Forget one buyer's values (as added before)."""
        self.recency.remove(values[0])
        self.frequency.remove(values[1])
        self.monetary.remove(values[2])

    def merge(self, other: Population) -> None:
        """Add another shard's counts."""
        self.recency.merge(other.recency)
        self.frequency.merge(other.frequency)
        self.monetary.merge(other.monetary)

    def __len__(self) -> int:
        return self.frequency.total

    def scores(self, values: tuple[float, float, float]) -> tuple[int, int, int]:
        """(R, F, M), each 1-5, of one buyer's values against this population."""
        n = self.frequency.total
        return (
            quintile(self.recency.rank(values[0]), n),
            quintile(self.frequency.rank(values[1]), n),
            quintile(self.monetary.rank(values[2]), n),
        )

    def to_dict(self) -> dict:
        """Plain data, to publish for the other shards."""
        return {
            "recency": self.recency.to_dict(),
            "frequency": self.frequency.to_dict(),
            "monetary": self.monetary.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Population:
        """Rebuild from `to_dict` output."""
        population = cls.__new__(cls)
        population.recency = sketch_from_dict(data["recency"])
        population.frequency = sketch_from_dict(data["frequency"])
        population.monetary = sketch_from_dict(data["monetary"])
        return population


def rfm_record(
    values: tuple[float, float, float], population: Population, now: float
) -> dict[str, Any]:
    """What the profile shows under `rfm`: scores, their segment, and the values scored."""
    r, f, m = population.scores(values)
    return {
        "r": r,
        "f": f,
        "m": m,
        "score": f"{r}{f}{m}",
        "segment": segment_of(r, f),
        "recency_days": round(max(now - values[0], 0.0) / DAY, 2),
        "at": now,
        # the values this shard's population counted for the customer (to forget them later)
        "k": list(values),
    }


def segment_sizes(records: Any) -> dict[str, int]:
    """Customers per named segment, every segment listed (zeros too)."""
    sizes = dict.fromkeys(SEGMENTS, 0)
    for record in records:
        sizes[record["segment"]] += 1
    return sizes

"""Significance of A/B results: the two-proportion z-test (pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ZTest:
    """Rate of b against rate of a: z score, two-sided p-value, relative lift."""

    rate_a: float
    rate_b: float
    z: float
    p_value: float
    lift: float | None  # (rate_b - rate_a) / rate_a; None when rate_a is 0


def two_proportion_z(success_a: int, total_a: int, success_b: int, total_b: int) -> ZTest | None:
    """Pooled two-proportion z-test of b against a; None when a side has no trials.

    >>> round(two_proportion_z(100, 1000, 130, 1000).p_value, 3)
    0.035
    """
    if total_a <= 0 or total_b <= 0:
        return None
    pa, pb = success_a / total_a, success_b / total_b
    pooled = (success_a + success_b) / (total_a + total_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / total_a + 1 / total_b))
    z = 0.0 if se == 0 else (pb - pa) / se
    p = math.erfc(abs(z) / math.sqrt(2))
    lift = (pb - pa) / pa if pa > 0 else None
    return ZTest(pa, pb, z, p, lift)

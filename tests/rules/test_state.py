"""Trigger-instance records (engine.rules.state): what an ended instance leaves behind."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from engine.rules import state

DAY = 86400.0


@dataclass
class Rule:
    name: str = "browse"
    reentry: float = 7 * DAY
    max_instances: int = 3


def reference_prune(done: dict, start: float, reentry: float) -> None:
    """The records end() keeps, written as plainly as possible."""
    if len(done) > 1:
        keep = max(state.MIN_DONE_AGE, reentry if math.isfinite(reentry) else 0.0)
        if math.isfinite(reentry):
            for old in [k for k, entry in done.items() if entry[1] < start - keep]:
                del done[old]
        while len(done) > state.MAX_DONE:
            del done[min(done, key=lambda k: done[k][1])]


@given(
    # starts in whole days, so ties (one receivedAt for a whole batch) are common; a few
    # records, or about as many as are kept, so the cap is reached often
    starts=st.one_of(
        st.lists(st.integers(0, 40), max_size=10),
        st.lists(st.integers(0, 40), min_size=state.MAX_DONE - 5, max_size=state.MAX_DONE + 20),
    ),
    start=st.integers(0, 40),
    reentry=st.sampled_from([0.0, 3 * DAY, 30 * DAY, math.inf]),
)
def test_end_keeps_the_same_records_as_a_plain_scan(
    starts: list[int], start: int, reentry: float
) -> None:
    done = {f"k{i}": [f"k{i}@{s}", s * DAY, s * DAY + 60] for i, s in enumerate(starts)}
    expected = dict(done)
    expected["new"] = ["new@x", start * DAY, start * DAY + 120]
    reference_prune(expected, start * DAY, reentry)
    journey = {
        "i": {"browse": {"new": {"id": "new@x", "s": start * DAY, "n": 0, "d": 0.0, "t": {}}}},
        "done": {"browse": done},
    }
    state.end(journey, Rule(reentry=reentry), "new", start * DAY + 120, "evicted", "test")
    assert journey["done"]["browse"] == expected
    assert list(journey["done"]["browse"]) == list(expected)  # and in the same order

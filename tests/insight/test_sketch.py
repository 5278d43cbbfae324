from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.insight.sketch import DDSketch, LinearSketch, sketch_from_dict


def test_quantiles_are_within_the_relative_accuracy() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 1.5) for _ in range(5000)]
    sketch = DDSketch(0.01)
    for v in values:
        sketch.add(v)
    ordered = sorted(values)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        exact = ordered[int(q * (len(ordered) - 1))]
        assert sketch.quantile(q) == pytest.approx(exact, rel=0.021)


def test_remove_forgets_exactly_what_add_learned() -> None:
    sketch = DDSketch(0.01)
    for v in (1, 2, 2, 3, 50):
        sketch.add(v)
    sketch.remove(2)
    sketch.remove(50)
    again = DDSketch(0.01)
    for v in (1, 2, 3):
        again.add(v)
    assert sketch.counts == again.counts and sketch.total == 3
    sketch.remove(1000)  # never counted: nothing changes, never negative
    assert sketch.total == 3


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0, 1e6, allow_nan=False), max_size=60),
    st.lists(st.floats(0, 1e6, allow_nan=False), max_size=60),
)
def test_merging_two_shards_equals_one_sketch_of_both(left: list, right: list) -> None:
    a, b, whole = DDSketch(0.02), DDSketch(0.02), DDSketch(0.02)
    for v in left:
        a.add(v)
        whole.add(v)
    for v in right:
        b.add(v)
        whole.add(v)
    a.merge(b)
    assert a.counts == whole.counts and a.total == whole.total


def test_rank_is_the_share_strictly_below() -> None:
    sketch = LinearSketch(1.0)
    for v in (1, 1, 2, 3, 5):
        sketch.add(v)
    assert [sketch.rank(v) for v in (1, 2, 3, 5, 9)] == [0.0, 0.4, 0.6, 0.8, 1.0]


def test_round_trip_through_plain_data_and_refusing_other_parameters() -> None:
    sketch = DDSketch(0.01)
    for v in (0, 0.5, 12, 12, 400):
        sketch.add(v)
    back = sketch_from_dict(
        {**sketch.to_dict(), "counts": {str(k): n for k, n in sketch.counts.items()}}
    )
    assert back.counts == sketch.counts and back.total == 5
    with pytest.raises(ValueError, match="cannot merge"):
        sketch.merge(DDSketch(0.05))

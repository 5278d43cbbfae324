"""The shard-wide timer index: ordering, lazy invalidation, rebuild."""

from __future__ import annotations

import random

import pytest

from engine.rules import TimerIndex


def test_pop_due_returns_customers_in_deadline_order() -> None:
    index = TimerIndex()
    for customer, at in (("c", 30.0), ("a", 10.0), ("b", 20.0)):
        index.schedule(customer, at)
    assert index.next_deadline() == 10.0
    assert index.pop_due(25.0) == ["a", "b"]
    assert index.next_deadline() == 30.0 and len(index) == 1
    assert index.pop_due(29.9) == []


def test_moving_a_deadline_later_keeps_one_heap_entry() -> None:
    index = TimerIndex()
    index.schedule("a", 10.0)
    for at in range(11, 1000):
        index.schedule("a", float(at))
    assert len(index._heap) == 1
    assert index.pop_due(500.0) == []  # the early entry is re-queued, not reported
    assert index.next_deadline() == 999.0
    assert index.pop_due(999.0) == ["a"]


def test_moving_a_deadline_earlier_and_removing() -> None:
    index = TimerIndex()
    index.schedule("a", 50.0)
    index.schedule("a", 5.0)
    index.schedule("b", 7.0)
    index.schedule("b", None)
    index.discard("missing")
    assert index.next_deadline() == 5.0
    assert index.pop_due(100.0) == ["a"]
    assert index.next_deadline() is None and len(index) == 0


def test_rebuild_from_profiles() -> None:
    index = TimerIndex.rebuild([("a", 3.0), ("b", None), ("c", 1.0)])
    assert "b" not in index and index.deadline("a") == 3.0
    assert index.pop_due(10.0) == ["c", "a"]


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_plain_dict_under_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    index, model = TimerIndex(), {}
    now = 0.0
    for _ in range(3000):
        customer = f"c{rng.randrange(50)}"
        roll = rng.random()
        if roll < 0.6:
            at = now + rng.uniform(0, 100)
            index.schedule(customer, at)
            model[customer] = at
        elif roll < 0.7:
            index.schedule(customer, None)
            model.pop(customer, None)
        else:
            now += rng.uniform(0, 20)
            expected = sorted((at, c) for c, at in model.items() if at <= now)
            got = index.pop_due(now)
            assert got == [c for _, c in expected]
            for c in got:
                del model[c]
        assert index.next_deadline() == (min(model.values()) if model else None)
        assert len(index._heap) <= 2 * len(model) + 60

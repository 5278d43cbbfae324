from __future__ import annotations

import pytest

from engine.insight.live import LiveInsight
from engine.insight.rfm import Population, quintile, segment_of
from engine.partition import Partition

DAY = 86400.0
T0 = 1_700_000_000.0


def order(customer: str, at: float, revenue: float, n: int) -> dict:
    return {
        "type": "track",
        "event": "Order Completed",
        "customer": customer,
        "userId": customer,
        "anonymousId": None,
        "messageId": f"{customer}-{n}",
        "ts": at,
        "receivedAt": at,
        "properties": {"order_id": f"{customer}-{n}", "revenue": revenue, "products": []},
    }


def test_a_hand_computed_population() -> None:
    """Five buyers, scored by hand.

    customer  last order   orders  revenue   R  F  M   segment
    a         day 100      5       500       5  5  5   champions
    b         day 90       3       200       4  4  4   loyal
    c         day 50       2       80        3  3  2   need_attention
    d         day 10       1       80        2  1  2   hibernating
    e         day 1        1       10        1  1  1   hibernating
    Each score is ceil(5 * (buyers strictly below + 1) / 5 buyers):
    R: last-order days 1, 10, 50, 90, 100 -> below 0, 1, 2, 3, 4 -> 1, 2, 3, 4, 5.
    F: orders 1, 1, 2, 3, 5 -> below 0, 0, 2, 3, 4 -> 1, 1, 3, 4, 5.
    M: revenue 10, 80, 80, 200, 500 -> below 0, 1, 1, 3, 4 -> 1, 2, 2, 4, 5.
    """
    rows = {
        "a": (100, 5, 500.0),
        "b": (90, 3, 200.0),
        "c": (50, 2, 80.0),
        "d": (10, 1, 80.0),
        "e": (1, 1, 10.0),
    }
    partition = Partition(lambda c: True, insight=LiveInsight(co=None))
    n = 0
    for customer, (last_day, orders, revenue) in rows.items():
        for k in range(orders):
            n += 1
            at = T0 + (last_day - (orders - 1 - k)) * DAY
            partition.apply(order(customer, at, revenue / orders, n))
    for profile in partition.profiles.values():  # everyone against the final population
        partition.insight.refresh(profile, T0 + 101 * DAY)
    got = {
        c: (p.rfm["r"], p.rfm["f"], p.rfm["m"], p.rfm["segment"])
        for c, p in partition.profiles.items()
    }
    assert got == {
        "a": (5, 5, 5, "champions"),
        "b": (4, 4, 4, "loyal"),
        "c": (3, 3, 2, "need_attention"),
        "d": (2, 1, 2, "hibernating"),
        "e": (1, 1, 1, "hibernating"),
    }
    assert partition.profiles["a"].rfm["score"] == "555"
    assert partition.profiles["c"].rfm["recency_days"] == pytest.approx(51.0)
    assert len(partition.insight.population) == 5


def test_every_purchase_moves_the_customer_in_the_population() -> None:
    partition = Partition(lambda c: True, insight=LiveInsight(co=None))
    partition.apply(order("a", T0, 10.0, 1))
    partition.apply(order("b", T0 + DAY, 20.0, 2))
    population = partition.insight.population
    assert population.frequency.rank(2) == 1.0  # nobody has two orders yet
    partition.apply(order("a", T0 + 2 * DAY, 30.0, 3))
    assert len(population) == 2  # a moved from 1 to 2 orders: removed, then added
    assert population.frequency.rank(2) == 0.5
    assert partition.profiles["a"].rfm["k"] == [T0 + 2 * DAY, 2.0, 40.0]
    partition.apply({**order("a", T0, 0, 0), "type": "_erase", "messageId": "erase"})
    assert len(population) == 1


def test_shard_populations_merge_into_the_whole_one() -> None:
    values = [(T0 + i * DAY, float(1 + i % 4), 10.0 * (i + 1)) for i in range(40)]
    whole, left, right = Population(), Population(), Population()
    for i, v in enumerate(values):
        whole.add(v)
        (left if i % 2 else right).add(v)
    left.merge(right)
    assert all(left.scores(v) == whole.scores(v) for v in values)
    assert Population.from_dict(left.to_dict()).scores(values[7]) == whole.scores(values[7])


@pytest.mark.parametrize(
    ("r", "f", "name"),
    [
        (5, 5, "champions"),
        (5, 4, "champions"),
        (4, 5, "loyal"),
        (3, 4, "loyal"),
        (5, 2, "potential_loyalist"),
        (4, 3, "potential_loyalist"),
        (5, 1, "new_customers"),
        (4, 1, "promising"),
        (3, 3, "need_attention"),
        (3, 2, "about_to_sleep"),
        (2, 4, "at_risk"),
        (1, 3, "at_risk"),
        (1, 5, "cant_lose"),
        (2, 2, "hibernating"),
        (1, 1, "hibernating"),
    ],
)
def test_the_classic_grid(r: int, f: int, name: str) -> None:
    assert segment_of(r, f) == name


def test_quintile_edges() -> None:
    # ten buyers: 0 below -> 1 (top of the first fifth is 2 buyers), 9 below -> 5
    assert [quintile(b / 10, 10) for b in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert quintile(0.0, 1) == 5  # a lone buyer is the best there is
    assert quintile(0.0, 0) == 1


def test_merging_two_buyers_counts_one_person_once() -> None:
    partition = Partition(lambda c: True, insight=LiveInsight(co=None))
    partition.apply(order("ann", T0, 10.0, 1))
    anon = {**order("anon-1", T0 + 60, 30.0, 2), "userId": None, "anonymousId": "anon-1"}
    partition.apply(anon)
    assert len(partition.insight.population) == 2
    identify = {
        "type": "identify",
        "customer": "ann",
        "userId": "ann",
        "anonymousId": "anon-1",
        "messageId": "id-1",
        "ts": T0 + 120,
        "receivedAt": T0 + 120,
        "traits": {},
    }
    partition.apply(identify)
    ann = partition.profiles["ann"]
    assert "anon-1" not in partition.profiles and ann.orders == 2
    assert len(partition.insight.population) == 1  # one person, counted once
    assert ann.rfm["k"] == [T0 + 60, 2.0, 40.0]


def test_events_with_only_a_product_id_are_enriched_from_the_catalog() -> None:
    from engine.recs.cooccur import CoSettings

    insight = LiveInsight(co=CoSettings())
    insight.catalog = {"p1": {"id": "p1", "category": "Shoes", "name": "Boot", "price": 80.0}}
    partition = Partition(lambda c: True, insight=insight)
    view = {**order("ann", T0, 0, 1), "event": "Product Viewed", "properties": {"product_id": "p1"}}
    partition.apply(view)
    assert partition.profiles["ann"].recent[-1][3] == "Shoes"  # category from the catalog
    assert insight.counts.popular["Shoes"] == {"p1": insight.counts.mass["p1"]}
    other = {**view, "messageId": "v2", "properties": {"product_id": "p2", "name": "Lamp"}}
    partition.apply(other)
    assert insight.take_described() == {"p2": {"name": "Lamp"}}  # unknown: what events say


def test_restoring_a_checkpoint_from_before_rfm_counts_and_scores_its_buyers() -> None:
    import orjson

    old = Partition(lambda c: True)  # no insight: profiles without rfm
    for n, customer in enumerate(["a", "b"]):
        for k in range(n + 1):
            old.apply(order(customer, T0 + n * DAY + k, 10.0, n * 10 + k))
    saved = old.take_changes().profiles
    assert all(orjson.loads(v)["rfm"] is None for v in saved.values())
    restored = Partition(lambda c: True, insight=LiveInsight(co=None))
    restored.restore(saved, {}, set())
    assert len(restored.insight.population) == 2
    assert restored.profiles["b"].rfm["score"] == "555"
    assert restored.profiles["a"].rfm["r"] == 3  # ceil(5 * (0 below + 1) / 2 buyers)


def test_an_empty_or_much_smaller_merge_does_not_score_buyers_against_nobody() -> None:
    partition = Partition(lambda c: True, insight=LiveInsight(co=None))
    partition.insight.merged = Population()  # a flush before any order
    partition.apply(order("ann", T0, 10.0, 1))
    assert partition.profiles["ann"].rfm["score"] == "555"  # against its own shard: the best
    partition.insight.merged = Population.from_dict(partition.insight.population.to_dict())
    assert partition.insight.scoring_population() is partition.insight.merged


def test_order_lines_take_their_category_from_the_catalog() -> None:
    from engine.recs.cooccur import CoSettings

    insight = LiveInsight(co=CoSettings())
    insight.catalog = {"p1": {"id": "p1", "category": "Shoes"}}
    partition = Partition(lambda c: True, insight=insight)
    bought = order("ann", T0, 80.0, 1)
    bought["properties"]["products"] = [{"product_id": "p1"}, {"product_id": "p9", "name": "X"}]
    partition.apply(bought)
    assert set(insight.counts.popular["Shoes"]) == {"p1"}
    assert insight.take_described() == {"p9": {"name": "X"}}

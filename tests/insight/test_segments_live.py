"""Segments maintained live: entering and leaving fire rules, on events, timers and scores."""

from __future__ import annotations

from pathlib import Path

from engine.insight.live import LiveInsight
from engine.insight.model import Registry
from engine.partition import Partition
from engine.profile import Profile
from engine.rules import RuleSet
from tests.insight.models import write_model
from tests.rules.harness import DAY, T0, event

SEGMENT_RULES = """
[segment.carting]
if = "len(cart) > 0"

[[rule]]
name = "welcome_to_cart"
enter_segment = "carting"
reentry = "always"
suppress = false
[[rule.step]]
template = "entered"

[[rule]]
name = "bye_cart"
leave_segment = "carting"
reentry = "always"
suppress = false
[[rule.step]]
template = "left"
"""


def partition(text: str, **insight) -> Partition:
    return Partition(
        lambda c: True, rules=RuleSet.from_toml(text), insight=LiveInsight(co=None, **insight)
    )


def templates(part: Partition) -> list[str]:
    return [s["template"] for s in part.take_changes().sends]


def test_entering_and_leaving_fire_their_rules() -> None:
    part = partition(SEGMENT_RULES)
    part.apply(event("Product Viewed", T0, "ann", product_id="p1"))
    assert templates(part) == []
    part.apply(event("Product Added", T0 + 60, "ann", product_id="p1", price=5))
    assert templates(part) == ["entered"]
    assert part.segment_members("carting", 10) == {"known": True, "count": 1, "members": ["ann"]}
    part.apply(event("Order Completed", T0 + 120, "ann", products=[{"product_id": "p1"}]))
    assert templates(part) == ["left"]
    assert part.segment_members("carting", 10)["count"] == 0
    assert part.segment_members("nonsense", 10)["known"] is False


def test_a_customer_older_than_the_segment_is_baselined_not_welcomed() -> None:
    part = partition(SEGMENT_RULES)
    # a customer from before this segment existed: cart full, never evaluated against it
    old = Profile("old")
    old.first_seen = old.last_seen = T0 - DAY
    old.cart = {"p1": {"product_id": "p1", "quantity": 1}}
    old.seen = {"m-old": T0 - DAY}
    part.profiles["old"] = old
    part.apply(event("Product Viewed", T0, "old", product_id="p2"))
    assert templates(part) == []  # already in the cart segment: recorded, not "entered"
    assert part.segment_members("carting", 10)["members"] == ["old"]
    part.apply(event("Order Completed", T0 + 60, "old", products=[]))
    assert templates(part) == ["left"]  # but leaving afterwards is a real move


def test_a_brand_new_customer_qualifying_on_the_first_event_enters() -> None:
    part = partition(SEGMENT_RULES)
    part.apply(event("Product Added", T0, "new", product_id="p1"))
    assert templates(part) == ["entered"]


LAPSED = """
[segment.lapsed]
if = "orders > 0 and days_since(last_order_at) > 30"

[[rule]]
name = "win_back"
enter_segment = "lapsed"
suppress = false
[[rule.step]]
template = "win-back"
"""


def test_time_based_segments_are_rechecked_without_events() -> None:
    part = partition(LAPSED)
    part.rules.recheck_s = DAY
    part.apply(event("Order Completed", T0, "ann", revenue=20, products=[]))
    assert templates(part) == []
    for day in range(1, 31):
        part.tick(T0 + day * DAY + 1)
    assert templates(part) == []  # 30 days: not yet lapsed
    part.tick(T0 + 32 * DAY)
    assert templates(part) == ["win-back"]
    assert part.segment_members("lapsed", 5)["members"] == ["ann"]


def test_without_the_recheck_nothing_moves_until_an_event() -> None:
    part = partition(LAPSED)  # recheck_s left at 0
    part.apply(event("Order Completed", T0, "ann", revenue=20, products=[]))
    part.tick(T0 + 40 * DAY)
    assert templates(part) == []


RFM_SEGMENT = """
[segment.best]
if = "rfm.segment == 'champions'"
"""


def test_rfm_segments_follow_purchases_and_the_recheck() -> None:
    part = partition(RFM_SEGMENT)
    part.rules.recheck_s = DAY
    for n, customer in enumerate(["a", "b", "c", "d", "e"]):
        for k in range(n + 1):
            part.apply(
                event("Order Completed", T0 + n * DAY + k * 60, customer, revenue=10, products=[])
            )
    # each buyer was scored against the buyers before them: "a", alone then, was the best
    assert part.profiles["a"].rfm["score"] == "555"
    assert part.profiles["e"].rfm["segment"] == "champions"
    part.tick(T0 + 6 * DAY)  # the daily re-check scores everyone against all five
    assert part.profiles["a"].rfm["segment"] == "hibernating"
    assert part.segment_members("best", 10)["members"] == ["e"]
    assert part.segment_members("champions", 10)["members"] == ["e"]  # the RFM name works too


SCORED = """
[segment.churn_risk]
if = "score('churn') >= 0.5"

[[rule]]
name = "save_them"
enter_segment = "churn_risk"
suppress = false
[[rule.step]]
template = "we-value-you"
"""


def test_model_scores_move_customers_into_segments(tmp_path: Path) -> None:
    write_model(tmp_path)
    registry = Registry(tmp_path, ("churn",))
    registry.reload_all()
    part = partition(SCORED, models=True)
    part.apply(event("Order Completed", T0, "once", revenue=20, products=[]))
    for k in range(4):
        part.apply(event("Order Completed", T0 + k, "loyal", revenue=20, products=[]))
    assert templates(part) == []
    assert part.score(registry.models, T0 + 10) == 2
    assert templates(part) == ["we-value-you"]  # one order: churn risk; four: not
    assert part.profiles["once"].scores["churn"]["label"] is True
    assert part.profiles["loyal"].scores["churn"]["label"] is False
    assert part.segment_members("churn_risk", 10)["members"] == ["once"]


def test_the_simulator_rechecks_time_based_segments_like_a_shard() -> None:
    from engine.simulate import Simulator

    sim = Simulator(RuleSet.from_toml(LAPSED), start=T0)
    sim.event(
        T0,
        {
            "type": "track",
            "userId": "ann",
            "event": "Order Completed",
            "messageId": "o1",
            "properties": {"revenue": 20},
        },
    )
    sim.run_until(T0 + 30 * DAY)
    assert sim.sends == []
    sim.run_until(T0 + 32 * DAY)
    assert [s.template for s in sim.sends] == ["win-back"]
    assert sim.partition.profiles["ann"].rfm["segment"] == "champions"  # a lone buyer is the best

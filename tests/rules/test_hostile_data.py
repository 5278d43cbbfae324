"""Client data of the wrong shape, through the documented rule shapes and the starter
rules: a rule that cannot read it does not fire; every other rule goes on."""

from __future__ import annotations

from engine.rules.files import STARTER
from tests.rules.harness import DAY, HOUR, MIN, T0, Runner, rules

HOSTILE = """
[[rule]]
name = "cat_views"
on = "Product Viewed"
if = "count('Product Viewed', 7d, category=event.category) >= 2"
[[rule.step]]
template = "t"

[[rule]]
name = "browse"
on = "Product Viewed"
key = "event.product_id"
cancel_on = [{ event = "Order Completed", if = "key in product_ids(event)" }]
[[rule.step]]
wait = "1h"
template = "b"

[[rule]]
name = "line_total"
on = "Product Added"
payload = { line = "event.price * event.quantity" }
[[rule.step]]
wait = "15m"
template = "c"
"""


def test_a_list_for_a_category_counts_nothing_and_stops_nothing() -> None:
    run = Runner(rules(HOSTILE), "cat")
    run.at(T0, "Product Viewed", product_id="p1", category=["Shoes", "Sale"])
    sent = run.at(T0 + MIN, "Product Viewed", product_id="p1", category=["Shoes", "Sale"])
    assert "cat_views" not in [s.rule for s in sent]
    assert [s.rule for s in run.until(T0 + 2 * HOUR)] == ["browse"]


def test_products_that_are_no_list_cancel_nothing_and_stop_nothing() -> None:
    run = Runner(rules(HOSTILE), "num")
    run.at(T0, "Product Viewed", product_id="p1")
    run.at(T0 + MIN, "Order Completed", order_id="o1", products=5)  # not a list: no lines
    assert [s.rule for s in run.until(T0 + 2 * HOUR)] == ["browse"]


def test_a_list_times_a_huge_number_is_null_not_an_allocation() -> None:
    # [1] * 2**40 asked for a terabyte; a smaller number quietly took hundreds of MB.
    run = Runner(rules(HOSTILE), "mul")
    run.at(T0, "Product Added", product_id="p1", price=[1], quantity=2**40)
    [sent] = run.until(T0 + HOUR)
    assert sent.rule == "line_total" and sent.payload["line"] is None
    run.at(T0 + 2 * HOUR, "Product Viewed", product_id="p2")  # and the customer goes on
    assert [s.rule for s in run.until(T0 + 4 * HOUR)] == ["browse"]


def test_a_bad_order_does_not_stop_the_starter_rules_for_the_customer() -> None:
    # "products": 5 on an order (ingest takes it) made the cross-sell's payload raise
    # at its due time, and every later event raised again before any rule was
    # looked at: no cart email, for good where a rule has no expiry.
    from engine.rules import RuleSet

    run = Runner(RuleSet.from_toml(STARTER.read_text(), source=str(STARTER)), "poisoned")
    run.at(T0, "Order Completed", order_id="o1", revenue=20, products=5)
    cross_sell = run.until(T0 + 4 * DAY)
    assert [s.rule for s in cross_sell] == ["post_purchase_cross_sell"]
    assert cross_sell[0].payload["bought"] == []
    run.at(T0 + 5 * DAY, "Product Added", product_id="p9", price=30)
    assert "cart_abandonment" in [s.rule for s in run.until(T0 + 7 * DAY)]


def test_a_condition_that_holds_for_a_number_fires_as_explain_says() -> None:
    # Rules of the form event.P in [...] are looked up by value, and a value neither
    # text nor a whole number (9.5) was passed over: explain said the condition
    # held, and the rule never fired.
    ruleset = rules(
        """
[[rule]]
name = "sizes"
on = "Product Viewed"
if = "event.size in ['9.5', '10']"
[[rule.step]]
template = "t"
"""
    )
    run = Runner(ruleset, "size")
    assert [s.rule for s in run.at(T0, "Product Viewed", size=9.5)] == ["sizes"]
    assert run.at(T0 + DAY, "Product Viewed", size=11.5) == []


def test_a_function_that_fails_on_a_value_is_null_where_it_stands() -> None:
    # A number too large for a time (10**400) made days_since raise. Counted as null
    # for the whole expression, `or` lost its other half and `not` its meaning; the
    # call alone is null, and explain shows what the engine decided.
    from engine.rules.explain import explain

    ruleset = rules(
        """
[[rule]]
name = "stale"
on = "Viewed"
if = "not (days_since(event.since) < 1)"
[[rule.step]]
template = "t"

[[rule]]
name = "either"
on = "Viewed"
if = "days_since(event.since) > 1 or event.vip == true"
[[rule.step]]
template = "t"
"""
    )
    run = Runner(ruleset, "ann")
    sent = run.at(T0, "Viewed", since=10**400, vip=True)
    assert sorted(s.rule for s in sent) == ["either", "stale"]
    for report in explain(ruleset, run.profile, T0):
        assert report["check"]["passed"] is True

"""explain: fired, waiting (with the due time) or which condition failed with the values seen."""

from __future__ import annotations

from engine.rules import RuleSet
from engine.rules.files import STARTER

from .harness import MIN, T0, Runner


def by_rule(report: list[dict]) -> dict[str, dict]:
    return {item["rule"]: item for item in report}


def test_waiting_fired_and_failed_conditions() -> None:
    ruleset = RuleSet.from_toml(STARTER.read_text(), source="starter.toml")
    run = Runner(ruleset, "bob")
    run.at(T0, "Product Viewed", product_id="p9", name="Boot")
    run.at(T0 + MIN, "Product Viewed", product_id="p9", name="Boot")
    run.at(T0 + 2 * MIN, "Product Added", product_id="p1", price=20)
    report = by_rule(ruleset.explain(run.profile, T0 + 5 * MIN))

    cart = report["cart_abandonment"]
    assert cart["status"] == "waiting"
    [waiting] = cart["waiting"]
    assert waiting["step"] == 1 and waiting["due_iso"] == "2024-03-04T09:17:00Z"
    assert waiting["exit"]["passed"] is False

    browse = report["browse_abandonment"]
    assert browse["status"] == "not triggered"
    check = browse["check"]
    assert check["event"] == "Product Viewed" and check["passed"] is False
    first = check["condition"]["parts"][0]
    assert first["passed"] is False
    assert first["seen"] == {'count("Product Viewed", 7d, product=event.product_id)': 2}
    assert browse["gates"]["suppressed_by"] == "cart_abandonment"

    vip = report["vip_welcome"]["check"]
    assert vip["member"] is False and vip["condition"]["parts"][0]["seen"] == {
        "revenue": 0.0,
        "orders": 0,
    }
    assert report["re_engagement"]["check"]["idle_until_iso"] == "2024-04-03T09:02:00Z"

    run.until(T0 + 20 * MIN)
    after = by_rule(ruleset.explain(run.profile, T0 + 20 * MIN))["cart_abandonment"]
    assert after["status"] == "waiting" and after["waiting"][0]["step"] == 2
    assert after["sends"] == [{"at": T0 + 17 * MIN, "at_iso": "2024-03-04T09:17:00Z"}]
    assert after["last"]["outcome"] == "sent"


def test_explain_names_consent_and_quiet_hours() -> None:
    ruleset = RuleSet.from_toml(STARTER.read_text(), source="starter.toml")
    run = Runner(ruleset, "bob")
    run.at(T0, "Unsubscribed")
    report = ruleset.explain(run.profile, T0 + 13 * 3600)  # 22:00 UTC
    assert {item["status"] for item in report} == {"blocked"}
    assert report[0]["gates"]["consent"] == "unsubscribed"
    assert report[0]["gates"]["quiet_hours_now"] is True

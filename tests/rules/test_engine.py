"""The decision core: entries, absence, flows, priority, caps, quiet hours, consent, timers."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

import orjson
import pytest

from engine.profile import Profile
from engine.rules import RuleSet, merge_journey, send_id
from engine.rules.files import STARTER

from .harness import DAY, HOUR, MIN, T0, Runner, event, rules

STEP = """
[[rule.step]]
template = "{name}-{n}"
wait = "{wait}"
"""


def rule(name: str, head: str, *waits: str, extra: str = "") -> str:
    """A [[rule]] with `head` lines and one step per wait."""
    steps = "".join(STEP.format(name=name, n=i + 1, wait=w) for i, w in enumerate(waits or ("0s",)))
    return f'\n[[rule]]\nname = "{name}"\n{head}\n{extra}\n{steps}'


def starter() -> RuleSet:
    return RuleSet.from_toml(STARTER.read_text(), source="starter.toml")


# -- entry, absence and flows -----------------------------------------------------------------
def test_cart_abandonment_reminder_and_follow_up() -> None:
    run = Runner(starter(), "bob")
    run.at(T0, "Product Added", product_id="p1", price=90)
    run.at(T0 + 5 * MIN, "Product Added", product_id="p2", price=10)  # restarts the wait
    run.until(T0 + 3 * DAY)
    assert run.times() == [
        (20 * MIN, "cart_abandonment", 1),
        (20 * MIN + DAY, "cart_abandonment", 2),
    ]
    first, second = run.sends
    assert first.template == "cart-reminder-classic" and second.template == "cart-followup"
    assert first.payload["cart_total"] == 100.0 and set(first.payload["items"]) == {"p1", "p2"}
    assert first.payload["blocks"] == ["cart_summary", "recommendations"]
    assert first.instance == second.instance and first.send_id != second.send_id


def test_a_purchase_cancels_the_waiting_reminder() -> None:
    run = Runner(starter(), "bob")
    run.at(T0, "Product Added", product_id="p1", price=90)
    run.at(
        T0 + 10 * MIN, "Order Completed", order_id="o1", revenue=90, products=[{"product_id": "p1"}]
    )
    assert [s for s in run.until(T0 + 2 * DAY) if s.rule == "cart_abandonment"] == []
    assert run.profile.journey["o"]["cart_abandonment"][1] == "cancelled"


def test_the_exit_condition_is_checked_before_every_send() -> None:
    text = rule("flow", 'on = "Signed Up"\nexit = "orders > 0"', "0s", "1d", "2d")
    run = Runner(rules(text))
    run.at(T0, "Signed Up")
    run.at(T0 + HOUR, "Order Completed", revenue=5)  # not a cancel event: only exit sees it
    run.until(T0 + 5 * DAY)
    assert run.times() == [(0.0, "flow", 1)]
    assert run.profile.journey["o"]["flow"][1:] == ["exited", "orders > 0"]


def test_a_step_whose_condition_fails_is_skipped_and_the_flow_goes_on() -> None:
    text = rule("flow", 'on = "Signed Up"', "1h", "1h", "1h")
    text = text.replace('template = "flow-2"', 'template = "flow-2"\nif = "orders > 0"')
    run = Runner(rules(text))
    run.at(T0, "Signed Up")
    run.until(T0 + DAY)
    assert run.times() == [(HOUR, "flow", 1), (3 * HOUR, "flow", 3)]  # step 3 waits from the skip


def test_cancel_matches_on_the_instance_key() -> None:
    text = rule(
        "browse",
        'on = "Product Viewed"\nkey = "event.product_id"',
        "1h",
        extra='cancel_on = [{ event = "Order Completed", if = "key in product_ids(event)" }]',
    )
    run = Runner(rules(text))
    run.at(T0, "Product Viewed", product_id="a")
    run.at(T0 + MIN, "Product Viewed", product_id="b")
    run.at(T0 + 2 * MIN, "Order Completed", products=[{"product_id": "a"}])
    run.until(T0 + DAY)
    assert [s.payload for s in run.sends] == [{}] and run.sends[0].instance.startswith("b@")


def test_restart_only_moves_the_matching_instance() -> None:
    text = rule(
        "r",
        'on = "Product Viewed"\nkey = "event.product_id"\nrestart_on = ["Product Viewed"]',
        "1h",
    )
    run = Runner(rules(text))
    run.at(T0, "Product Viewed", product_id="a")
    run.at(T0 + 10 * MIN, "Product Viewed", product_id="b")
    run.at(T0 + 30 * MIN, "Product Viewed", product_id="a")  # a's hour starts again
    run.until(T0 + DAY)
    assert [(s.at - T0, s.instance.split("@")[0]) for s in run.sends] == [
        (70 * MIN, "b"),
        (90 * MIN, "a"),
    ]


def test_a_key_that_evaluates_to_null_does_not_enter() -> None:
    run = Runner(rules(rule("r", 'on = "Product Viewed"\nkey = "event.product_id"')))
    assert run.at(T0, "Product Viewed") == []
    assert "i" not in run.profile.journey


@pytest.mark.parametrize(
    ("reentry", "expected"),
    [("always", [0.0, 2 * HOUR, 3 * HOUR]), ("90m", [0.0, 2 * HOUR]), ("once", [0.0])],
)
def test_reentry(reentry: str, expected: list[float]) -> None:
    run = Runner(rules(rule("r", f'on = "Signed In"\nreentry = "{reentry}"')))
    for offset in (0.0, HOUR, 2 * HOUR, 3 * HOUR):
        run.at(T0 + offset, "Signed In")
    assert [s.at - T0 for s in run.sends] == (
        expected if reentry != "always" else [0.0, HOUR, 2 * HOUR, 3 * HOUR]
    )


def test_the_same_event_twice_gives_one_send() -> None:
    ruleset = rules(rule("r", 'on = "Signed In"\nreentry = "always"'))
    profile = Profile("bob")
    ev = event("Signed In", T0)
    first = ruleset.on_event(profile, ev, T0)
    again = ruleset.on_event(
        profile, dict(ev, messageId="other"), T0 + 5
    )  # same time: same instance
    assert len(first) == 1 and again == []


def test_send_ids_are_deterministic_across_processes_and_restarts() -> None:
    sends = []
    for _ in range(2):
        run = Runner(starter(), "bob")
        run.at(T0, "Product Added", product_id="p1", price=90)
        run.until(T0 + 2 * DAY)
        sends.append([s.send_id for s in run.sends])
    assert sends[0] == sends[1]
    assert sends[0][0] == send_id("cart_abandonment", 1, "bob", f"@{T0!r}")


def test_timers_due_before_an_event_fire_before_it() -> None:
    """Due at 1h, the cancelling event at 2h arrives before anyone polled: the step still ran."""
    ruleset = rules(rule("r", 'on = "Signed Up"\ncancel_on = ["Signed In"]', "1h"))
    profile = Profile("bob")
    ruleset.on_event(profile, event("Signed Up", T0), T0)
    sends = ruleset.on_event(profile, event("Signed In", T0 + 2 * HOUR), T0 + 2 * HOUR)
    assert [(s.rule, s.at - T0) for s in sends] == [("r", 2 * HOUR)]  # sent now, judged as of 1h


def test_a_stale_cart_reminder_is_not_sent_after_a_purchase_learned_late() -> None:
    """State conditions (the cart, orders) read the latest profile: no "you forgot" after buying."""
    ruleset = starter()
    profile = Profile("bob")
    from engine.profile import Limits, apply_event

    for ev in (
        event("Product Added", T0, product_id="p1", price=9),
        event("Order Completed", T0 + 20 * MIN, revenue=9, products=[{"product_id": "p1"}]),
    ):
        apply_event(profile, ev, Limits())
        sends = ruleset.on_event(profile, ev, ev["ts"])
    assert sends == []
    assert profile.journey["o"]["cart_abandonment"][1] == "exited"


# -- priority and suppression ------------------------------------------------------------------
PRIORITY = (
    """
[rules]
suppression = "12h"
"""
    + rule("high", 'on = "A"\npriority = 10', "30m")
    + rule("low", 'on = "B"\npriority = 1', "1h")
    + rule("free", 'on = "B"\npriority = 1\nsuppress = false', "1h")
    + rule("peer", 'on = "C"\npriority = 10', "0s")
)


def test_a_higher_priority_send_silences_lower_ones_within_the_window() -> None:
    run = Runner(rules(PRIORITY))
    run.at(T0, "A")
    run.at(T0 + 40 * MIN, "B")  # high sent at 30m; low would send at 1h40m
    run.at(T0 + 13 * HOUR, "B")  # outside the window: goes
    run.until(T0 + DAY)
    assert [(s.rule, s.at - T0) for s in run.sends] == [
        ("high", 30 * MIN),
        ("free", 100 * MIN),
        ("free", 14 * HOUR),
        ("low", 14 * HOUR),
    ]
    assert run.profile.journey["o"]["low"][1] == "sent"


def test_a_pending_higher_priority_instance_silences_lower_ones() -> None:
    run = Runner(rules(PRIORITY))
    run.at(T0, "B")  # low due at 1h
    run.at(T0 + 45 * MIN, "A")  # high due at 1h15m, pending when low comes due
    run.until(T0 + DAY)
    assert [(s.rule, s.at - T0) for s in run.sends] == [("free", HOUR), ("high", 75 * MIN)]
    assert run.profile.journey["o"]["low"][1:] == ["suppressed", "high"]


def test_equal_priority_and_no_window_do_not_suppress() -> None:
    run = Runner(rules(PRIORITY))
    run.at(T0, "A")
    run.at(T0 + 40 * MIN, "C")
    assert {s.rule for s in run.until(T0 + DAY)} | {s.rule for s in run.sends} == {"high", "peer"}
    plain = Runner(rules(PRIORITY.replace('suppression = "12h"', 'suppression = "0s"')))
    plain.at(T0, "A")
    plain.at(T0 + 40 * MIN, "B")
    plain.until(T0 + DAY)
    assert sorted(s.rule for s in plain.sends) == ["free", "high", "low"]


def test_same_event_entries_go_by_priority() -> None:
    text = (
        "[rules]\nsuppression = '1h'\n"
        + rule("a", 'on = "X"\npriority = 1')
        + rule("b", 'on = "X"\npriority = 2')
    )
    run = Runner(rules(text))
    assert [s.rule for s in run.at(T0, "X")] == ["b"]


# -- caps --------------------------------------------------------------------------------------
def test_rule_cap_skips_and_global_cap_defers() -> None:
    text = (
        "[rules]\ncaps = ['2/1d']\non_cap = 'defer'\n"
        + rule("r", 'on = "X"\nreentry = "always"\ncaps = ["1/1h"]\non_cap = "skip"')
        + rule("d", 'on = "Y"\nreentry = "always"')
    )
    run = Runner(rules(text))
    run.at(T0, "X")
    run.at(T0 + 30 * MIN, "X")  # rule cap: skipped
    run.at(T0 + 2 * HOUR, "X")
    run.at(T0 + 3 * HOUR, "Y")  # global cap full until T0 + 1d
    run.until(T0 + 2 * DAY)
    assert [(s.rule, s.at - T0) for s in run.sends] == [("r", 0.0), ("r", 2 * HOUR), ("d", DAY)]


def test_a_zero_cap_blocks_everything() -> None:
    run = Runner(rules(rule("r", 'on = "X"\ncaps = ["0/1d"]\non_cap = "defer"')))
    run.at(T0, "X")
    assert run.until(T0 + 9 * DAY) == [] and run.sends == []


# -- quiet hours -------------------------------------------------------------------------------
def _paris(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("Europe/Paris")).timestamp()


@pytest.mark.parametrize(
    ("event_at", "expected"),
    [
        ("2024-03-04 20:00", "2024-03-05 08:00"),  # due 21:00 Paris: wait for the morning
        ("2024-03-05 03:00", "2024-03-05 08:00"),  # due 04:00: later the same morning
        ("2024-03-05 10:00", "2024-03-05 11:00"),  # due 11:00: goes at once
        ("2024-03-30 22:00", "2024-03-31 08:00"),  # across the switch to summer time
    ],
)
def test_quiet_hours_in_the_customers_time_zone(event_at: str, expected: str) -> None:
    run = Runner(rules('[rules]\nquiet_hours = "21:00-08:00"\n' + rule("r", 'on = "X"', "1h")))
    run.profile.traits["timezone"] = "Europe/Paris"
    run.at(_paris(event_at), "X")
    run.until(_paris(event_at) + 2 * DAY)
    assert [s.at for s in run.sends] == [_paris(expected)]


def test_quiet_hours_can_be_switched_off_per_rule_and_default_to_the_ruleset_zone() -> None:
    text = '[rules]\nquiet_hours = "21:00-08:00"\ntimezone = "America/New_York"\n'
    run = Runner(
        rules(text + rule("r", 'on = "X"', "0s") + rule("s", 'on = "X"\nquiet_hours = false', "0s"))
    )
    late = T0 + 14 * HOUR  # 23:00 UTC = 18:00 in New York: allowed for both
    assert {s.rule for s in run.at(late, "X")} == {"r", "s"}
    night = T0 + 20 * HOUR  # 05:00 UTC = 00:00 in New York
    assert [s.rule for s in run.at(night, "X")] == ["s"]


# -- consent -----------------------------------------------------------------------------------
def test_unsubscribing_clears_pending_timers_and_blocks_new_entries() -> None:
    run = Runner(starter(), "bob")
    run.at(T0, "Product Added", product_id="p1", price=9)
    assert run.ruleset.next_deadline(run.profile) is not None
    run.at(T0 + 5 * MIN, "Unsubscribed")
    assert run.ruleset.next_deadline(run.profile) is None
    assert run.at(T0 + 10 * MIN, "Product Added", product_id="p2", price=9) == []
    assert run.until(T0 + 40 * DAY) == [] and run.sends == []


def test_consent_is_checked_even_if_the_shell_calls_on_due_directly() -> None:
    run = Runner(starter(), "bob")
    run.at(T0, "Product Added", product_id="p1", price=9)
    run.profile.consent["unsubscribed"] = True  # e.g. changed by a merge
    assert run.ruleset.on_due(run.profile, T0 + DAY) == []


# -- durability --------------------------------------------------------------------------------
def _restart(profile: Profile) -> Profile:
    return Profile.from_dict(orjson.loads(orjson.dumps(profile.to_dict())))


def test_timers_survive_a_checkpoint_and_fire_late_on_recovery() -> None:
    run = Runner(starter(), "bob")
    run.at(T0, "Product Added", product_id="p1", price=9)
    restored = _restart(run.profile)
    assert starter().next_deadline(restored) == T0 + 15 * MIN
    late = T0 + 3 * HOUR  # the engine was down when the reminder fell due
    [send] = starter().on_due(restored, late)
    assert send.at == late and send.step == 1
    assert send.send_id == send_id("cart_abandonment", 1, "bob", f"@{T0!r}")


def test_a_timer_overdue_beyond_expires_is_dropped() -> None:
    text = rule("r", 'on = "X"\nexpires = "1h"', "15m")
    run = Runner(rules(text))
    run.at(T0, "X")
    assert run.ruleset.on_due(run.profile, T0 + 15 * MIN + 2 * HOUR) == []
    assert run.profile.journey["o"]["r"][1] == "expired"
    assert run.ruleset.next_deadline(run.profile) is None


def test_instances_of_a_removed_rule_are_dropped_quietly() -> None:
    run = Runner(rules(rule("gone", 'on = "X"', "1h")))
    run.at(T0, "X")
    newer = rules(rule("other", 'on = "Y"', "1h"))
    assert newer.on_due(run.profile, T0 + DAY) == []
    assert newer.next_deadline(run.profile) is None


def test_journey_state_is_plain_json_and_bounded() -> None:
    text = rule(
        "r",
        'on = "Product Viewed"\nkey = "event.product_id"\nreentry = "always"\nmax_instances = 5',
        "1h",
    ) + rule("s", 'on = "Signed In"\nreentry = "always"')
    run = Runner(rules(text))
    for i in range(400):
        run.at(T0 + i * MIN, "Product Viewed", product_id=f"p{i}")
        run.at(T0 + i * MIN + 1, "Signed In")
    journey = run.profile.journey
    assert orjson.loads(orjson.dumps(journey)) == journey
    assert len(journey["i"]["r"]) <= 5
    assert len(journey["h"]) <= 200
    assert all(len(done) <= 100 for done in journey["done"].values())


# -- experiments and payload -------------------------------------------------------------------
def test_variants_are_sticky_and_follow_the_weights() -> None:
    text = rule("r", 'on = "X"\nvariants = { a = 75, b = 25 }\nholdout = 10\nreentry = "always"')
    ruleset = rules(text.replace('template = "r-1"', 'template = "r-{variant}"'))
    seen = Counter()
    for i in range(4000):
        run = Runner(ruleset, f"c{i}")
        first = run.at(T0, "X")[0]
        again = run.at(T0 + HOUR, "X")[0]
        assert first.variant == again.variant
        assert first.deliver == (first.variant != "holdout")
        assert first.template == f"r-{first.variant}"
        seen[first.variant] += 1
    assert 340 < seen["holdout"] < 460  # 10%
    assert 2500 < seen["a"] < 2900 and 800 < seen["b"] < 1000  # 75/25 of the rest


def test_payload_carries_profile_fields_trigger_properties_and_last_events() -> None:
    text = rule(
        "r",
        'on = "Product Viewed"\npayload = { who = "traits.first_name", product = "event.name", '
        'cat = "last(\'Product Viewed\').category", spent = "revenue" }\nblocks = ["recs"]',
        "1h",
    )
    run = Runner(rules(text))
    run.at(T0 - 1, "identify", kind="identify", first_name="Bob")
    run.at(
        T0, "Product Viewed", product_id="p1", name="Boot", category="Shoes", description="x" * 500
    )
    run.at(T0 + MIN, "Product Viewed", product_id="p2", name="Hat", category="Hats")
    [send] = run.until(T0 + DAY)
    assert send.payload == {
        "who": "Bob",
        "product": "Boot",
        "cat": "Hats",
        "spent": 0.0,
        "blocks": ["recs"],
    }
    # the trigger keeps only what later steps read, not the whole event
    assert run.profile.journey["done"]["r"] and "description" not in str(run.profile.journey)


# -- segments and inactivity -------------------------------------------------------------------
SEGMENTS = (
    """
[segment.big]
if = "revenue >= 100 or traits.tier == 'gold'"
"""
    + rule("hello", 'enter_segment = "big"')
    + rule("bye", 'leave_segment = "big"\nreentry = "always"')
    + rule("gated", 'on = "X"\nif = "segment(\'big\')"\nreentry = "always"')
)


def test_segment_entry_and_exit() -> None:
    run = Runner(rules(SEGMENTS))
    assert run.at(T0, "X") == []
    assert [s.rule for s in run.at(T0 + 1, "Order Completed", revenue=150)] == ["hello"]
    assert [s.rule for s in run.at(T0 + 2, "X")] == ["gated"]
    assert [s.rule for s in run.at(T0 + 3, "Order Refunded")] == []
    ann = Runner(rules(SEGMENTS), "ann")
    assert [s.rule for s in ann.at(T0, "identify", kind="identify", tier="gold")] == ["hello"]
    assert [s.rule for s in ann.at(T0 + 1, "identify", kind="identify", tier="silver")] == ["bye"]


def test_segments_are_recomputed_only_on_events_that_can_change_them() -> None:
    from engine.rules.plan import segment_events

    vip = RuleSet.from_toml('[segment.vip]\nif = "revenue >= 500 or orders >= 5"', source="t")
    assert segment_events(vip.segments) == {"Order Completed"}
    carts = RuleSet.from_toml('[segment.c]\nif = "cart_total() > 50"', source="t")
    assert segment_events(carts.segments) == {"Product Added", "Product Removed", "Order Completed"}
    for text in ("traits.tier == 'gold'", "days_since(last_order_at) < 30", "count('X', 7d) > 1"):
        assert (
            segment_events(RuleSet.from_toml(f'[segment.s]\nif = "{text}"', source="t").segments)
            is None
        )


def test_inactivity_counts_only_activity_events() -> None:
    text = rule(
        "idle",
        'inactive_for = "30d"\nactivity = ["Email Opened", "Product Viewed"]\nif = "orders == 0"',
    )
    run = Runner(rules(text))
    run.at(T0, "Product Viewed", product_id="p1")
    run.at(T0 + 10 * DAY, "Email Delivered")  # not activity
    run.at(T0 + 20 * DAY, "Email Opened")  # pushes the deadline to day 50
    run.until(T0 + 60 * DAY)
    assert run.times() == [(50 * DAY, "idle", 1)]
    buyer = Runner(rules(text), "ann")
    buyer.at(T0, "Order Completed", revenue=1)
    buyer.at(T0 + 1, "Product Viewed")
    buyer.until(T0 + 60 * DAY)
    assert buyer.sends == [] and buyer.profile.journey["o"]["idle"][1] == "not entered"


def test_windows_ignore_events_after_the_logical_time() -> None:
    """A timer due at 1h evaluates "viewed in the last hour" as of 1h, not as of when it ran."""
    text = rule("r", 'on = "Signed Up"', "1h").replace(
        'template = "r-1"', 'template = "r-1"\nif = "count(\'Product Viewed\', 1h) == 0"'
    )
    ruleset = rules(text)
    run = Runner(ruleset)
    run.at(T0, "Signed Up")
    from engine.profile import Limits, apply_event

    apply_event(
        run.profile, event("Product Viewed", T0 + 2 * HOUR), Limits()
    )  # folded in before on_due
    assert [s.rule for s in ruleset.on_due(run.profile, T0 + 3 * HOUR)] == ["r"]


def test_session_dwell_rule() -> None:
    text = rule(
        "sneakers", 'on = "Product Viewed"\nif = "session_dwell(category=\'Sneakers\') > 10m"'
    )
    run = Runner(rules(text))
    for minute in (0, 4, 8):
        assert run.at(T0 + minute * MIN, "Product Viewed", category="Sneakers") == []
    assert [s.rule for s in run.at(T0 + 12 * MIN, "Product Viewed", category="Sneakers")] == [
        "sneakers"
    ]
    other = Runner(rules(text), "ann")
    for minute in (0, 4, 8, 50, 54, 58):  # two short sessions: never 10 minutes in one
        assert other.at(T0 + minute * MIN, "Product Viewed", category="Sneakers") == []


def test_merge_journey_moves_pending_instances() -> None:
    run = Runner(starter(), "anon-1")
    run.at(T0, "Product Added", product_id="p1", price=9)
    known = Profile("bob")
    known.cart = run.profile.cart  # as merge_profiles does
    merge_journey(known.journey, run.profile.journey)
    assert starter().next_deadline(known) == T0 + 15 * MIN
    assert [s.rule for s in starter().on_due(known, T0 + 15 * MIN)] == ["cart_abandonment"]


def test_merge_journey_ends_instances_that_began_before_either_side_opted_out() -> None:
    anon = Runner(starter(), "anon-1")
    anon.at(T0, "Product Added", product_id="p1", price=9)
    known = Runner(starter(), "bob")
    known.at(T0 + MIN, "Product Viewed", product_id="p2")
    known.at(T0 + 2 * MIN, "", kind="identify", unsubscribed=True)  # silences bob's journey
    known.at(T0 + 3 * MIN, "", kind="identify", unsubscribed=False)
    known.profile.cart = anon.profile.cart
    merge_journey(known.profile.journey, anon.profile.journey)
    journey = known.profile.journey
    assert "cart_abandonment" not in journey.get("i", {})  # began before bob opted out
    assert journey["done"]["cart_abandonment"][""][1] == T0
    assert journey["o"]["cart_abandonment"][1] == "consent"
    assert known.until(T0 + 2 * DAY) == []
    # the other way round: an opt-out on the merged-in side ends the survivor's instances
    later = Runner(starter(), "cleo")
    later.at(T0, "Product Added", product_id="p1", price=9)
    gone = Runner(starter(), "anon-2")
    gone.at(T0 + MIN, "", kind="identify", unsubscribed=True)
    merge_journey(later.profile.journey, gone.profile.journey)
    assert "i" not in later.profile.journey and later.profile.journey["silenced"] == T0 + MIN

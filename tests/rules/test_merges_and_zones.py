"""Rule decisions across identity merges, time zones passed over, consent coming back,
and expressions fed values that used to raise (each raise lost the event's effects
on the rules)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from engine.profile import Limits, merge_profiles
from engine.rules import RuleSet, merge_journey
from engine.rules.files import STARTER
from engine.rules.gates import assign, next_allowed
from tests.rules.harness import DAY, HOUR, MIN, T0, Runner, event, rules


def _starter() -> RuleSet:
    return RuleSet.from_toml(STARTER.read_text(encoding="utf-8"), source="starter")


def _merge(into: Runner, other: Runner) -> None:
    merge_profiles(into.profile, other.profile, Limits())
    merge_journey(into.profile.journey, other.profile.journey)


def test_a_send_id_does_not_depend_on_whether_the_merge_came_before_the_timer() -> None:
    # Live, the reminder fired under the anonymous id; a replay after a crash can
    # apply the merge first. Different ids: the outbox's mark let a second email by.
    ruleset = _starter()
    live = Runner(ruleset, "anon-x")
    live.at(T0, "Product Added", product_id="p1", price=10)
    live.until(T0 + 16 * MIN)
    replayed_anon = Runner(ruleset, "anon-x")
    replayed_anon.at(T0, "Product Added", product_id="p1", price=10)
    user = Runner(ruleset, "user-x")
    _merge(user, replayed_anon)
    user.until(T0 + 16 * MIN)
    assert [s.send_id for s in live.sends] == [s.send_id for s in user.sends]
    assert len(live.sends) == 1


def test_an_instance_keeps_its_experiment_arm_across_a_merge() -> None:
    ruleset = _starter()
    rule = ruleset.by_name["cart_abandonment"]
    held = next(
        f"anon{i}"
        for i in range(1000)
        if assign(rule.experiment, f"anon{i}", rule.variants, rule.holdout) == "holdout"
        and assign(rule.experiment, "user", rule.variants, rule.holdout) != "holdout"
    )
    anon = Runner(ruleset, held)
    anon.at(T0, "Product Added", product_id="p1", price=10)
    anon.until(T0 + 20 * MIN)
    assert [(s.step, s.deliver) for s in anon.sends] == [(1, False)]
    user = Runner(ruleset, "user")
    _merge(user, anon)
    user.until(T0 + 2 * DAY)
    assert user.sends and all(s.variant == "holdout" and not s.deliver for s in user.sends)


def test_a_merge_remembers_the_later_of_two_ended_instances() -> None:
    ruleset = rules(
        """
[[rule]]
name = "r"
on = "Signed Up"
reentry = "7d"
[[rule.step]]
template = "t"
"""
    )
    user, anon = Runner(ruleset, "user"), Runner(ruleset, "anon")
    user.at(T0 - 30 * DAY, "Signed Up")
    anon.at(T0 - DAY, "Signed Up")
    _merge(user, anon)
    assert user.at(T0, "Signed Up") == []  # one day after the anonymous side's entry


def test_a_time_zone_that_is_no_zone_is_passed_over_for_the_traits_one() -> None:
    ruleset = rules(
        """
[rules]
quiet_hours = "21:00-08:00"
[[rule]]
name = "r"
on = "Signed Up"
[[rule.step]]
template = "t"
"""
    )
    run = Runner(ruleset, "raj")
    run.profile.timezone = "GMT+05:30"  # context.timezone as some SDKs send it
    run.profile.traits["timezone"] = "Asia/Kolkata"
    evening = datetime(2024, 3, 4, 18, 0).timestamp()  # UTC: 23:30 in Kolkata
    assert run.at(evening, "Signed Up") == []  # quiet there: deferred
    sent = run.until(evening + DAY)
    local = datetime.fromtimestamp(sent[0].at, ruleset.zone(run.profile))
    assert (local.hour, local.minute) == (8, 0)


def test_expressions_fed_odd_values_are_null_not_errors() -> None:
    ruleset = rules(
        """
[[rule]]
name = "big"
on = "Viewed"
if = "round(event.price * 10) > 5"
[[rule.step]]
template = "t"

[[rule]]
name = "lookup"
on = "Viewed"
if = "traits[event.plan] == 'gold'"
[[rule.step]]
template = "t"

[[rule]]
name = "window"
on = "Viewed"
if = "count('Viewed', traits.window) >= 1"
[[rule.step]]
template = "t"
"""
    )
    run = Runner(ruleset, "odd")
    run.at(T0 - HOUR, "x", kind="identify", window="7d")
    sends = run.at(T0, "Viewed", price=1e308, plan=["a"])
    assert [s.rule for s in sends] == ["window"]  # a computed "7d" window works
    run.profile.traits["window"] = {"not": "a duration"}
    assert run.at(T0 + MIN, "Viewed", price=float("nan"), plan={"a": 1}) == []


def test_quiet_hours_hold_through_the_repeated_hour_of_a_fall_back() -> None:
    ny = ZoneInfo("America/New_York")
    quiet = (22 * 60, 90)  # 22:00-01:30
    # 01:10 the second time round (EST): 01:30 EDT is past, 01:30 EST is ahead
    at = datetime(2024, 11, 3, 1, 10, fold=1, tzinfo=ny).timestamp()
    allowed = datetime.fromtimestamp(next_allowed(at, ny, quiet), ny)
    assert (allowed.hour, allowed.minute, allowed.utcoffset().total_seconds()) == (1, 30, -5 * 3600)
    # the first time round (EDT): the first 01:30 is the end
    early = datetime(2024, 11, 3, 1, 10, fold=0, tzinfo=ny).timestamp()
    assert next_allowed(early, ny, quiet) == early + 20 * MIN


def test_quiet_hours_ending_in_a_spring_forward_gap_end_when_the_clocks_jump() -> None:
    ny = ZoneInfo("America/New_York")
    at = datetime(2024, 3, 10, 1, 30, tzinfo=ny).timestamp()  # quiet 23:00-02:30
    allowed = datetime.fromtimestamp(next_allowed(at, ny, (23 * 60, 150)), ny)
    assert (allowed.hour, allowed.minute) == (3, 0)  # 02:30 never happens that night
    paris = ZoneInfo("Europe/Paris")  # and an ordinary night is unchanged
    t = datetime(2024, 3, 4, 22, 30, tzinfo=paris).timestamp()
    assert (
        next_allowed(t, paris, (21 * 60, 8 * 60))
        == datetime(2024, 3, 5, 8, tzinfo=paris).timestamp()
    )


def test_an_instance_checkpointed_before_owners_were_kept_keeps_its_send_ids() -> None:
    # Instances from before "c" name no customer: merged over, one would have
    # taken the surviving profile's id for its sends.
    ruleset = _starter()
    live = Runner(ruleset, "anon-y")
    live.at(T0, "Product Added", product_id="p1", price=10)
    live.until(T0 + 16 * MIN)
    old = Runner(ruleset, "anon-y")
    old.at(T0, "Product Added", product_id="p1", price=10)
    for running in old.profile.journey["i"].values():
        for inst in running.values():
            del inst["c"]
    user = Runner(ruleset, "user-y")
    merge_profiles(user.profile, old.profile, Limits())
    merge_journey(user.profile.journey, old.profile.journey, old.profile.id)
    user.until(T0 + 16 * MIN)
    assert [s.send_id for s in user.sends] == [s.send_id for s in live.sends]


def test_what_happened_while_opted_out_never_acts_whatever_the_order() -> None:
    # In order, a cart filled while unsubscribed sent nothing; delivered after the
    # resubscribe, the same event sent both reminders.
    ruleset = _starter()
    unsubscribed = event("Unsubscribed", T0)
    added = event("Product Added", T0 + HOUR, product_id="p1", price=10)
    resubscribed = event("x", T0 + 2 * HOUR, kind="identify", unsubscribed=False)
    in_order, late = Runner(ruleset), Runner(ruleset)
    for ev in (unsubscribed, added, resubscribed):
        in_order.feed(dict(ev), ev["ts"])
    late.feed(dict(unsubscribed), T0)
    late.feed(dict(resubscribed), T0 + 2 * HOUR)
    late.feed({**added, "receivedAt": T0 + 2 * HOUR + MIN}, T0 + 2 * HOUR + MIN)
    in_order.until(T0 + 3 * DAY)
    late.until(T0 + 3 * DAY)
    assert in_order.sends == [] and late.sends == []
    # and what happens after consent is back acts as usual
    late.at(T0 + 3 * DAY, "Product Added", product_id="p2", price=5)
    assert [s.rule for s in late.until(T0 + 3 * DAY + HOUR)] == ["cart_abandonment"]


def test_after_a_resubscribe_a_new_entry_is_not_taken_for_the_old_instance() -> None:
    # Silenced instances were ended at their step's due time (three days on), so an
    # entry after consent came back was refused as a late duplicate until then.
    ruleset = rules(
        """
[[rule]]
name = "welcome"
on = "Signed Up"
reentry = "1h"
[[rule.step]]
wait = "3d"
template = "t"
"""
    )
    run = Runner(ruleset)
    run.at(T0, "Signed Up")
    run.at(T0 + HOUR, "Unsubscribed")
    run.at(T0 + 2 * HOUR, "x", kind="identify", unsubscribed=False)
    run.at(T0 + DAY, "Signed Up")
    assert [(s.rule, s.at) for s in run.until(T0 + 10 * DAY)] == [("welcome", T0 + 4 * DAY)]


def test_an_opt_in_when_already_subscribed_changes_nothing() -> None:
    # Apps send email_opt_in: true with every identify. Each one moved the consent
    # line forward: a cart event 31 s late was refused, one at the same second too,
    # and a merge ended the anonymous visitor's running cart as "unsubscribed".
    cart = rules(
        """
[[rule]]
name = "cart"
on = "Product Added"
[[rule.step]]
wait = "1h"
template = "t"
"""
    )

    def opted_out_once(run: Runner) -> Runner:
        run.at(T0, "Unsubscribed")
        run.at(T0 + HOUR, "x", kind="identify", unsubscribed=False)
        return run

    later = T0 + 5 * DAY
    added = event("Product Added", later, product_id="p1")
    opt_in = event("x", later + 30, kind="identify", email_opt_in=True)
    in_order, swapped = opted_out_once(Runner(cart)), opted_out_once(Runner(cart))
    in_order.feed(dict(added), later)
    in_order.feed(dict(opt_in), later + 30)
    swapped.feed(dict(opt_in), later + 30)
    swapped.feed(dict(added), later + 31)  # the cart event 31 s late
    in_order.until(later + DAY)
    swapped.until(later + DAY)
    assert len(in_order.sends) == len(swapped.sends) == 1

    same_second = opted_out_once(Runner(cart))
    same_second.at(later, "x", kind="identify", email_opt_in=True)
    same_second.at(later, "Product Added", product_id="p1")
    assert [s.rule for s in same_second.until(later + DAY)] == ["cart"]

    user, anon = opted_out_once(Runner(cart, "user")), Runner(cart, "anon-1")
    anon.at(later, "Product Added", product_id="p1")
    user.at(later + 10 * MIN, "x", kind="identify", email_opt_in=True)
    _merge(user, anon)
    assert [s.rule for s in user.until(later + DAY)] == ["cart"]

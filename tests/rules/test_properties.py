"""Invariants under random behaviour (hypothesis): one send per trigger step, consent wins,
caps hold, duplicates and replays change nothing."""

from __future__ import annotations

import os
import random

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.profile import Limits, Profile, apply_event
from engine.rules import RuleSet, Send
from engine.rules.durations import parse_cap
from engine.rules.files import STARTER

from .harness import DAY, HOUR, MIN, T0

STRESS = """
[rules]
suppression = "2h"
caps = ["4/1d", "9/7d"]
on_cap = "defer"
quiet_hours = "22:00-07:00"
timezone = "Europe/Paris"

[segment.buyer]
if = "orders >= 2"

[[rule]]
name = "instant"
priority = 5
on = "Product Viewed"
key = "event.product_id"
reentry = "always"
caps = ["2/1h"]
on_cap = "skip"
variants = { a = 1, b = 1 }
holdout = 20
[[rule.step]]
template = "instant-{variant}"

[[rule]]
name = "flow"
priority = 9
on = "Product Added"
restart_on = ["Product Added"]
cancel_on = ["Order Completed", { event = "Product Removed", if = "len(cart) == 0" }]
exit = "len(cart) == 0"
reentry = "always"
[[rule.step]]
wait = "10m"
template = "flow-1"
[[rule.step]]
wait = "3h"
template = "flow-2"
[[rule.step]]
wait = "1d"
template = "flow-3"
if = "cart_total() > 20"

[[rule]]
name = "thanks"
priority = 1
on = "Order Completed"
key = "coalesce(event.order_id, 'o')"
reentry = "always"
caps = ["1/6h"]
on_cap = "defer"
[[rule.step]]
template = "thanks"
[[rule.step]]
wait = "2h"
template = "thanks-2"

[[rule]]
name = "welcome_buyer"
priority = 3
enter_segment = "buyer"
[[rule.step]]
template = "buyer"

[[rule]]
name = "idle"
inactive_for = "2d"
activity = ["Product Viewed", "Email Opened"]
cancel_on = ["Product Viewed"]
[[rule.step]]
template = "idle"
[[rule.step]]
wait = "1d"
template = "idle-2"
"""

RULESETS = {
    "starter": RuleSet.from_toml(STARTER.read_text(), source="starter.toml"),
    "stress": RuleSet.from_toml(STRESS, source="stress.toml"),
}
KINDS = [
    "Product Viewed",
    "Product Viewed",
    "Product Added",
    "Product Removed",
    "Order Completed",
    "Email Opened",
    "Unsubscribed",
    "opt-in",
    "opt-out",
]


@st.composite
def journeys(draw: st.DrawFn) -> list[dict]:
    """A time-ordered list of normalized events for one customer."""
    count = draw(st.integers(min_value=1, max_value=40))
    t = T0 + draw(st.integers(0, 86400))
    events = []
    for i in range(count):
        t += draw(st.sampled_from([1, 30, 5 * MIN, 20 * MIN, 2 * HOUR, 9 * HOUR, DAY, 3 * DAY]))
        kind = draw(st.sampled_from(KINDS))
        product = draw(st.sampled_from(["p1", "p2", "p3"]))
        props: dict = {
            "product_id": product,
            "price": draw(st.sampled_from([5, 30])),
            "name": product,
        }
        ev = {
            "type": "track",
            "customer": "c1",
            "userId": "c1",
            "anonymousId": None,
            "messageId": f"m{i}",
            "ts": t,
            "receivedAt": t,
            "properties": props,
        }
        if kind == "Order Completed":
            ev["properties"] = {
                "order_id": f"o{i}",
                "revenue": 30,
                "products": [{"product_id": product}],
            }
        if kind in ("opt-in", "opt-out"):
            ev.update(type="identify", traits={"email_opt_in": kind == "opt-in"})
            del ev["properties"]
        else:
            ev["event"] = kind
        events.append(ev)
    return events


class Driver:
    """Feeds events in delivery order; fires timers between them at their deadlines."""

    def __init__(self, ruleset: RuleSet, profile: Profile | None = None):
        self.ruleset = ruleset
        self.profile = profile or Profile("c1")
        self.limits = Limits()
        self.sends: list[Send] = []
        self.consent_violations = 0

    def _take(self, sends: list[Send]) -> None:
        if sends and self.profile.suppressed:
            self.consent_violations += 1
        self.sends += sends

    def timers(self, until: float, *, inclusive: bool) -> None:
        for _ in range(10_000):
            due = self.ruleset.next_deadline(self.profile)
            if due is None or due > until or (due == until and not inclusive):
                return
            self._take(self.ruleset.on_due(self.profile, due))
        raise AssertionError("timers did not converge")

    def deliver(self, event: dict) -> None:
        self.timers(event["ts"], inclusive=False)
        if self.profile.is_duplicate(event["messageId"], event["receivedAt"], self.limits):
            return
        apply_event(self.profile, event, self.limits)
        self._take(self.ruleset.on_event(self.profile, event, event["ts"]))

    def finish(self, events: list[dict]) -> list[Send]:
        self.timers(events[-1]["ts"] + 40 * DAY, inclusive=True)
        return self.sends


def run(ruleset: RuleSet, events: list[dict]) -> list[Send]:
    driver = Driver(ruleset)
    for event in events:
        driver.deliver(event)
    return driver.finish(events)


FAST = settings(
    max_examples=int(os.environ.get("NUDGE_HYPOTHESIS_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(st.sampled_from(sorted(RULESETS)), journeys())
def test_never_two_sends_for_one_trigger_step(name: str, events: list[dict]) -> None:
    sends = run(RULESETS[name], events)
    ids = [s.send_id for s in sends]
    assert len(ids) == len(set(ids))
    assert len({(s.rule, s.instance, s.step) for s in sends}) == len(sends)


@FAST
@given(st.sampled_from(sorted(RULESETS)), journeys())
def test_consent_always_wins(name: str, events: list[dict]) -> None:
    driver = Driver(RULESETS[name])
    blocked_from = None
    for event in events:
        driver.deliver(event)
    driver.finish(events)
    assert driver.consent_violations == 0
    # and never a send timed while the customer was opted out
    windows = []
    for event in events:
        suppressed = (
            event.get("event") == "Unsubscribed"
            or event.get("traits", {}).get("email_opt_in") is False
        )
        allowed = event.get("traits", {}).get("email_opt_in") is True
        if suppressed and blocked_from is None:
            blocked_from = event["ts"]
        elif allowed and blocked_from is not None:
            windows.append((blocked_from, event["ts"]))
            blocked_from = None
    if blocked_from is not None:
        windows.append((blocked_from, float("inf")))
    for send in driver.sends:
        assert not any(lo <= send.at < hi for lo, hi in windows), (send, windows)


@FAST
@given(journeys())
def test_caps_are_never_exceeded(events: list[dict]) -> None:
    ruleset = RULESETS["stress"]
    sends = run(ruleset, events)
    caps = [(parse_cap(c), None) for c in ("4/1d", "9/7d")]
    caps += [(parse_cap("2/1h"), "instant"), (parse_cap("1/6h"), "thanks")]
    for cap, rule in caps:
        times = sorted(s.at for s in sends if rule is None or s.rule == rule)
        for i, at in enumerate(times):
            inside = [t for t in times[: i + 1] if t > at - cap.per]
            assert len(inside) <= cap.max, (rule, cap, times)


@FAST
@given(st.sampled_from(sorted(RULESETS)), journeys(), st.randoms(use_true_random=False))
def test_shuffled_duplicate_deliveries_give_the_same_sends(
    name: str, events: list[dict], rng: random.Random
) -> None:
    ruleset = RULESETS[name]
    clean = [s.to_dict() for s in run(ruleset, events)]
    # each event may be delivered again later, at a random position (a stream replay or a retry)
    delivery = list(events)
    for event in events:
        if rng.random() < 0.5:
            later = rng.randrange(delivery.index(event) + 1, len(delivery) + 1)
            delivery.insert(later, dict(event))
    driver = Driver(ruleset)
    seen: set[str] = set()
    now = events[0]["ts"]
    for event in delivery:
        now = max(now, event["ts"])
        driver.deliver(event)  # the profile drops the copy by messageId
        if event["messageId"] in seen:
            # and even if a copy got past that dedupe, the rules would not send again
            driver._take(ruleset.on_event(driver.profile, event, now))
        seen.add(event["messageId"])
    assert [s.to_dict() for s in driver.finish(events)] == clean


@FAST
@given(st.sampled_from(sorted(RULESETS)), journeys(), st.data())
def test_replay_after_a_checkpoint_gives_the_same_send_ids(
    name: str, events: list[dict], data: st.DataObject
) -> None:
    ruleset = RULESETS[name]
    cut = data.draw(st.integers(0, len(events)))
    first = Driver(ruleset)
    for event in events[:cut]:
        first.deliver(event)
    checkpoint = orjson.dumps(first.profile.to_dict())
    sent_before = len(first.sends)
    for event in events[cut:]:
        first.deliver(event)
    whole = first.finish(events)
    # crash after the checkpoint: restore it and replay the stream from there
    second = Driver(ruleset, Profile.from_dict(orjson.loads(checkpoint)))
    for event in events[cut:]:
        second.deliver(event)
    replayed = second.finish(events)
    assert [s.to_dict() for s in replayed] == [s.to_dict() for s in whole[sent_before:]]

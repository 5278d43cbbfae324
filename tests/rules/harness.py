"""A tiny engine for rule tests: Profile + apply_event + RuleSet, time driven by hand."""

from __future__ import annotations

import itertools
from typing import Any

from engine.profile import Limits, Profile, apply_event
from engine.rules import RuleSet, Send

T0 = 1_709_542_800.0  # 2024-03-04 09:00:00 UTC, a Monday
MIN, HOUR, DAY = 60.0, 3600.0, 86400.0
_ids = itertools.count()


def event(
    name: str, at: float, customer: str = "bob", /, *, kind: str = "track", **props: Any
) -> dict:
    """A normalized event as the partition hands it to the rules."""
    out: dict[str, Any] = {
        "type": kind,
        "customer": customer,
        "userId": customer,
        "anonymousId": None,
        "messageId": f"m-{next(_ids)}",
        "ts": at,
        "receivedAt": at,
    }
    if kind == "track":
        out["event"] = name
        out["properties"] = props
    elif kind == "identify":
        out["traits"] = props
    return out


def rules(text: str) -> RuleSet:
    """A RuleSet from TOML text."""
    return RuleSet.from_toml(text, source="test.toml")


class Runner:
    """One customer's profile under a rule set; `at` and `due` drive time explicitly."""

    def __init__(self, ruleset: RuleSet, customer: str = "bob", *, limits: Limits | None = None):
        self.ruleset = ruleset
        self.profile = Profile(customer)
        self.limits = limits or Limits()
        self.sends: list[Send] = []

    def at(self, t: float, name: str, /, *, kind: str = "track", **props: Any) -> list[Send]:
        """Fire timers due before `t`, then apply and evaluate one event at `t`."""
        out = self.until(t, inclusive=False)
        ev = event(name, t, self.profile.id, kind=kind, **props)
        apply_event(self.profile, ev, self.limits)
        got = self.ruleset.on_event(self.profile, ev, t)
        self.sends += got
        return out + got

    def feed(self, ev: dict, now: float) -> list[Send]:
        """Apply a ready-made event at `now` (its own time may be earlier: a late delivery)."""
        out = self.until(now, inclusive=False)
        apply_event(self.profile, ev, self.limits)
        got = self.ruleset.on_event(self.profile, ev, now)
        self.sends += got
        return out + got

    def until(self, t: float, *, inclusive: bool = True) -> list[Send]:
        """Fire every timer due up to `t`, each at its own deadline (as a shard would)."""
        out = []
        while True:
            due = self.ruleset.next_deadline(self.profile)
            if due is None or due > t or (due == t and not inclusive):
                break
            got = self.ruleset.on_due(self.profile, due)
            out += got
        self.sends += out
        return out

    def times(self) -> list[tuple[float, str, int]]:
        """(offset from T0, rule, step) of every send so far."""
        return [(s.at - T0, s.rule, s.step) for s in self.sends]

"""Per-customer rule state, kept in `profile.journey` as plain JSON-able data.

Shape (short keys: it is checkpointed with every changed profile)::

    {
      "i":    {rule: {key: {"id": "key@start", "s": start, "n": next step (0-based),
                            "d": due, "t": {trigger properties kept}, "x": deferrals,
                            "c": the customer id it began with (send ids, experiment arm)}}},
      "idle": {rule: deadline},          # inactivity rules: when silence becomes "inactive"
      "done": {rule: {key: [instance id, start, end]}},   # last ended instance, for replay/reentry
      "h":    [[ts, rule], ...],         # sends (holdouts too), oldest first, for caps/suppression
      "seg":  [segment, ...],            # current segment membership
      "last": {event: {"ts": ts, prop: value, ...}},  # latest event of the names rules read
      "o":    {rule: [ts, outcome, detail]},          # last thing each rule did, for explain
      "silenced": ts,                    # latest event seen while the customer was opted
                                         # out, or the moment consent came back
      "optout": true,                    # while opted out (set by silence, cleared when
                                         # an event finds consent back)
      "ix":   {"product:Product Viewed": [n, held, newest, {product: [ts, ...]}]},
                                         # count()'s index of `recent` (engine.rules.index)
      "due":  earliest deadline,         # absent when nothing is pending
    }

Every part is bounded: instances by the rule's `max_instances`, `done` by
age and count, history by the longest cap or suppression window and a count,
the index by the size of `recent`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from functools import cache
from typing import Any

from engine.rules.functions import _ident

_EMPTY: dict = {}
MAX_HISTORY = 200
MAX_DONE = 100  # ended instances remembered per rule
_START = operator.itemgetter(1)  # of a done record: [instance id, start, end]
LATE_HORIZON = 86400.0  # events older than the customer's newest by more than this act on nothing
MIN_DONE_AGE = LATE_HORIZON  # so ended instances are remembered at least that long
MAX_KEPT_PROPS = 30
MAX_TEXT = 1000


def key_of(rule: Any, ctx: Any) -> str | None:
    """The instance key for the event in `ctx` ("" when the rule has no key)."""
    if rule.key is None:
        return ""
    value = rule.key.fn(ctx)
    if isinstance(value, (list, dict)):
        return None
    return _ident(value)


def kept(props: dict, keep: frozenset[str] | None) -> dict:
    """The trigger properties a running instance still needs."""
    if keep is None:
        out = {}
        for name, value in props.items():
            if len(out) >= MAX_KEPT_PROPS:
                break
            out[name] = value[:MAX_TEXT] if isinstance(value, str) else value
        return out
    if not keep:
        return {}
    return {name: props[name] for name in keep if name in props}


def remember_last(
    journey: dict, name: str, t: float, props: dict, keep: frozenset[str] | None
) -> None:
    """Keep the newest event called `name` (the properties rules read from it)."""
    last = journey.get("last")
    if last is None:
        last = journey["last"] = {}
    previous = last.get(name)
    if previous is None or keep is None:
        if previous is not None and previous["ts"] > t:
            return  # a late event does not replace a newer one
        entry = kept(props, keep) if keep is None else {k: props[k] for k in keep if k in props}
        entry["ts"] = t
        last[name] = entry
    elif previous["ts"] <= t:
        # update in place: no new dict per event for the hottest event names
        for key in keep:
            value = props.get(key)
            if value is None:
                previous.pop(key, None)
            else:
                previous[key] = value
        previous["ts"] = t


def note_activity(journey: dict, t: float, rules: Iterable[Any]) -> bool:
    """Push back the inactivity deadlines of `rules` after activity at `t`.

    Keeps `due` right by itself when it can; True when it must be recomputed
    (the deadline that moved was the earliest one).
    """
    idle = journey.get("idle")
    if idle is None:
        idle = journey["idle"] = {}
    due = journey.get("due")
    stale = False
    for rule in rules:
        deadline = t + rule.idle
        old = idle.get(rule.name)
        if old is None:
            idle[rule.name] = deadline
            if due is None or deadline < due:
                journey["due"] = due = deadline
        elif old < deadline:
            idle[rule.name] = deadline
            if old == due:
                stale = True
    return stale


def refresh_due(journey: dict) -> None:
    """Recompute the earliest deadline after any change to instances or idle timers."""
    due = math.inf
    for running in journey.get("i", _EMPTY).values():
        for inst in running.values():
            d = inst["d"]
            if d < due:
                due = d
    for deadline in journey.get("idle", _EMPTY).values():
        if deadline < due:
            due = deadline
    if due == math.inf:
        journey.pop("due", None)
    else:
        journey["due"] = due


def earliest(journey: dict, priority: dict[str, int]) -> tuple[float, str, str, str] | None:
    """(due, "step" | "idle", rule, key) of the next timer; ties go to higher priority.

    One pass comparing floats only: a journey can hold dozens of instances.
    """
    best_d = math.inf
    best: tuple[str, str, str] | None = None
    for name, running in journey.get("i", _EMPTY).items():
        for key, inst in running.items():
            d = inst["d"]
            if d < best_d:
                best_d, best = d, ("step", name, key)
            elif d == best_d and best is not None and _first(priority, name, key, best):
                best = ("step", name, key)
    for name, d in journey.get("idle", _EMPTY).items():
        if d < best_d:
            best_d, best = d, ("idle", name, "")
        elif d == best_d and best is not None and _first(priority, name, "", best):
            best = ("idle", name, "")
    return None if best is None else (best_d, *best)


def _first(priority: dict[str, int], name: str, key: str, other: tuple[str, str, str]) -> bool:
    """True if timer (name, key) goes before `other` at the same instant."""
    return (-priority.get(name, 0), name, key) < (-priority.get(other[1], 0), other[1], other[2])


def start(journey: dict, rule: Any, key: str, t: float, trigger: dict, *, owner: str) -> bool:
    """Open a trigger instance unless one is running for `key`, replayed, or too soon."""
    running = journey.get("i", {}).get(rule.name)
    if running is not None and key in running:
        return False
    previous = journey.get("done", {}).get(rule.name, {}).get(key)
    if previous is not None:
        # the time test first: most refusals are decided without spelling out an instance id
        if previous[1] <= t <= previous[-1] or previous[0] == f"{key}@{t!r}":
            # the same entry again, or one from while that instance ran (it was merged into
            # it then): a replay or a late duplicate
            return False
        if t - previous[1] < rule.reentry:
            outcome(journey, rule, t, "not re-entered", f"reentry {_span(rule.reentry)}")
            return False
    if running is None:
        running = journey.setdefault("i", {})[rule.name] = {}
    if len(running) >= rule.max_instances:
        oldest = min(running, key=lambda k: running[k]["s"])
        end(journey, rule, oldest, t, "evicted", f"more than {rule.max_instances} instances")
        running = journey.setdefault("i", {}).setdefault(rule.name, {})
    running[key] = {
        "id": f"{key}@{t!r}", "s": t, "n": 0, "d": t + rule.steps[0].wait, "t": trigger,
        "c": owner,
    }  # fmt: skip
    outcome(journey, rule, t, "entered", key)
    return True


def end(journey: dict, rule: Any, key: str, t: float, code: str, detail: str) -> None:
    """Close an instance and remember it, so a replay of its entry cannot reopen it."""
    running = journey["i"][rule.name]
    inst = running.pop(key)
    if not running:
        del journey["i"][rule.name]
        if not journey["i"]:
            del journey["i"]
    done = journey.setdefault("done", {}).setdefault(rule.name, {})
    done[key] = [inst["id"], inst["s"], max(t, inst["s"])]
    if len(done) > 1:
        keep = max(MIN_DONE_AGE, rule.reentry if math.isfinite(rule.reentry) else 0.0)
        if math.isfinite(rule.reentry):
            # relative to this instance's start (an event time), never to a later timer, so
            # every record a not-yet-stale event could collide with is still here
            cutoff = inst["s"] - keep
            # the oldest start found in C first: this runs at every instance's end, over up
            # to MAX_DONE records, and usually none is that old
            if min(map(_START, done.values())) < cutoff:
                for old in [k for k, entry in done.items() if entry[1] < cutoff]:
                    del done[old]
        while len(done) > MAX_DONE:
            # the first record with the earliest start, as min(done, key=...) picks it
            starts = list(map(_START, done.values()))
            del done[list(done)[min(range(len(starts)), key=starts.__getitem__)]]
    outcome(journey, rule, t, code, detail)


def drop(journey: dict, name: str, key: str) -> None:
    """Forget an instance of a rule that no longer exists (or lost its steps)."""
    running = journey["i"][name]
    del running[key]
    if not running:
        del journey["i"][name]
        if not journey["i"]:
            del journey["i"]


def advance(journey: dict, rule: Any, key: str, moment: float, code: str, detail: str) -> None:
    """Move past the current step: schedule the next one, or end after the last."""
    inst = journey["i"][rule.name][key]
    inst["n"] += 1
    inst.pop("x", None)
    if inst["n"] >= len(rule.steps):
        end(journey, rule, key, moment, code, detail)
        return
    inst["d"] = moment + rule.steps[inst["n"]].wait
    outcome(journey, rule, moment, code, detail)


def defer(journey: dict, rule: Any, key: str, until: float, why: str, limit: int) -> None:
    """Move the current step to `until`; give up after `limit` deferrals of one step."""
    inst = journey["i"][rule.name][key]
    inst["x"] = inst.get("x", 0) + 1
    if inst["x"] > limit:
        end(journey, rule, key, inst["d"], "dropped", f"deferred more than {limit} times")
        return
    inst["d"] = until
    outcome(journey, rule, until, "deferred", why)


def record_send(journey: dict, rule: str, t: float, keep: float) -> None:
    """Add a send to the history used by caps and suppression; forget what no window needs."""
    history = journey.setdefault("h", [])
    history.append([t, rule])
    if len(history) > 1 and history[-2][0] > t:
        history.sort(key=lambda entry: entry[0])
    horizon = history[-1][0] - keep
    drop_n = 0
    while drop_n < len(history) and history[drop_n][0] < horizon:
        drop_n += 1
    drop_n = max(drop_n, len(history) - MAX_HISTORY)
    if drop_n:
        del history[:drop_n]


def outcome(journey: dict, rule: Any, t: float, code: str, detail: str) -> None:
    """Remember the last thing `rule` did for this customer (for explain)."""
    journey.setdefault("o", {})[rule.name] = [t, code, detail[:200]]


def silence(journey: dict, ruleset: Any, t: float) -> None:
    """Consent withdrawn: end every running instance and idle timer, sending nothing.

    `silenced` remembers when, so that events older than that (late or
    duplicate deliveries) cannot start anything after consent returns.
    """
    if journey.get("silenced", -math.inf) < t:
        journey["silenced"] = t
    journey["optout"] = True  # until an event finds consent back (RuleSet.on_event)
    for name, running in list(journey.get("i", {}).items()):
        rule = ruleset.by_name.get(name)
        for key in list(running):
            if rule is None:
                drop(journey, name, key)
            else:  # ended now: a new entry once consent is back is no late duplicate
                end(journey, rule, key, t, "consent", "customer unsubscribed")
    journey.pop("idle", None)
    journey.pop("due", None)


def merge_journey(into: dict, other: dict, other_id: str | None = None) -> None:
    """Fold the journey of a merged identity (e.g. anonymous) into the surviving one.

    Running instances and ended-instance records move over unless `into`
    already has one for the same rule and key; send histories are combined
    so caps keep counting the emails the other identity received.

    Consent spans identities: an instance that began before either side's
    latest opted-out event (`silenced`) ends, as it would have had the two
    been one customer all along. (A shard runs the rules on the identifying
    event before the merge reaches it, so the surviving side may already be
    silenced.) The count index ("ix") is not merged: it is rebuilt from the
    merged `recent` when next asked.
    """
    for name, running in other.get("i", {}).items():
        target = into.setdefault("i", {}).setdefault(name, {})
        for key, inst in running.items():
            if "c" not in inst and other_id is not None:
                # begun before instances named their customer: it was `other_id`'s
                inst = {**inst, "c": other_id}
            target.setdefault(key, inst)
    for name, done in other.get("done", {}).items():
        target = into.setdefault("done", {}).setdefault(name, {})
        for key, entry in done.items():
            # the later instance is the one remembered: reentry counts from it
            if key not in target or target[key][1] < entry[1]:
                target[key] = entry
    if other.get("h"):
        into["h"] = sorted(into.get("h", []) + other["h"], key=lambda e: e[0])[-MAX_HISTORY:]
    for name, deadline in other.get("idle", {}).items():
        idle = into.setdefault("idle", {})
        idle[name] = max(idle.get(name, deadline), deadline)
    for name, entry in other.get("last", {}).items():
        last = into.setdefault("last", {})
        if name not in last or last[name]["ts"] < entry["ts"]:
            last[name] = entry
    if other.get("optout"):
        into["optout"] = True
    silenced = max(into.get("silenced", -math.inf), other.get("silenced", -math.inf))
    if silenced > -math.inf:
        into["silenced"] = silenced
        for name, running in list(into.get("i", {}).items()):
            for key, inst in list(running.items()):
                if inst["s"] <= silenced:  # ended as silence() ends it: at the opt-out
                    drop(into, name, key)
                    done = into.setdefault("done", {}).setdefault(name, {})
                    if key in done and done[key][1] >= inst["s"]:
                        continue  # the later of two instances is the one remembered
                    end = max(min(inst["d"], silenced), inst["s"])
                    done[key] = [inst["id"], inst["s"], end]
                    into.setdefault("o", {})[name] = [end, "consent", "customer unsubscribed"]
    refresh_due(into)


@cache  # one text per rule's reentry: spelled out on every refused re-entry
def _span(seconds: float) -> str:
    from engine.rules.durations import format_duration

    return "once" if math.isinf(seconds) else format_duration(seconds)

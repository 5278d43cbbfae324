"""Per event name, precomputed at load: exactly the work `on_event` has to do.

Rules are indexed by the event names that can move them (entry, cancel,
restart, activity). Entry rules whose condition starts from, or includes, an
equality on an event property (`event.category == "shoes"`, or
`event.product_id in ["a", "b"]`) are further indexed by that value, so a
rule set of hundreds evaluates only the few conditions that can hold.
Segments are recomputed only on events that can change what they read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from engine.rules.expr import Node
from engine.rules.model import EVENT, INACTIVE, Cancel, Rule, Segment

Entry = tuple[Rule, Callable[[Any], Any] | None]

# What apply_event changes, by profile field (engine.profile's handlers). A field
# missing here (traits, consent, counts, recent, ...) can change on any event.
_CHANGED_BY = {
    "orders": {"Order Completed"},
    "revenue": {"Order Completed"},
    "last_order_at": {"Order Completed"},
    "last_order_id": {"Order Completed"},
    "purchased": {"Order Completed"},
    "cart": {"Product Added", "Product Removed", "Order Completed"},
    "cart_id": {"Product Added", "Product Removed", "Order Completed"},
    "cart_updated": {"Product Added", "Product Removed", "Order Completed"},
    "email": {"Email Opened", "Email Link Clicked"},
    "groups": {"group"},
    "id": set(),
    "anonymous": set(),
    # RFM moves on orders (and on the periodic re-check); model scores only when the
    # shard scores a batch, which re-evaluates segments itself (RuleSet.on_change)
    "rfm": {"Order Completed"},
    "scores": set(),
}
# functions that read nothing beyond their arguments (and these profile fields)
_PURE_CALLS = {
    "len": (),
    "lower": (),
    "abs": (),
    "round": (),
    "min": (),
    "max": (),
    "coalesce": (),
    "product_ids": (),
    "segment": (),
    "cart_total": ("cart",),
    "score": ("scores",),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """What one event name asks of the rules."""

    track: bool  # remember this event for last() and explain
    keep: frozenset[str] | None  # which of its properties (None: all)
    cancels: tuple[tuple[Rule, Cancel], ...]
    restarts: tuple[Rule, ...]
    entries: tuple[Entry, ...]  # conditions evaluated on every such event
    dispatch: tuple[tuple[str, dict[str, tuple[Entry, ...]]], ...]  # (property, value -> entries)
    activity: tuple[Rule, ...]
    segments: bool  # recompute segment membership


def segment_events(segments: Iterable[Segment]) -> set[str] | None:
    """Event names that can change any segment's membership (None: any event)."""
    names: set[str] = set()
    for segment in segments:
        refs = segment.cond.refs
        if refs.calls - _PURE_CALLS.keys() or "now" in refs.names or "profile" in refs.names:
            return None
        for field in refs.names.union(*(_PURE_CALLS[c] for c in refs.calls)):
            if field not in _CHANGED_BY:
                return None
            names |= _CHANGED_BY[field]
    return names


def dispatch_key(node: Node) -> tuple[str, list[str]] | None:
    """(property, values) when the condition requires `event.P == "v"` or `event.P in [...]`.

    Only string constants: they compare exactly as the condition itself does.
    """
    parts = node.args if node.kind == "and" else [node]
    for part in parts:
        if part.kind != "compare" or part.value not in ("==", "in"):
            continue
        left, right = part.args
        if not (
            left.kind == "attr" and left.args[0].kind == "name" and left.args[0].value == "event"
        ):
            continue
        if not right.folded:
            continue
        values = right.constant if part.value == "in" else [right.constant]
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            return left.value, values
    return None


def build(
    rules: Iterable[Rule], segments: tuple[Segment, ...], tracked: dict[str, frozenset[str] | None]
) -> tuple[dict[str, Plan], Plan]:
    """Plans by event name, and the plan for any other name."""
    rules = list(rules)
    seg_events = segment_events(segments) if segments else set()
    activity_any = tuple(r for r in rules if r.kind == INACTIVE and r.activity is None)
    names = set(tracked) | (seg_events or set())
    for rule in rules:
        names |= {n for c in rule.cancels for n in c.events} | set(rule.restart_on) | set(rule.on)
        names |= set(rule.activity or ())
    plans = {
        name: _plan(name, rules, segments, seg_events, tracked, activity_any) for name in names
    }
    default = Plan(False, None, (), (), (), (), activity_any, bool(segments) and seg_events is None)
    return plans, default


def _plan(
    name: str,
    rules: list[Rule],
    segments: tuple[Segment, ...],
    seg_events: set[str] | None,
    tracked: dict[str, frozenset[str] | None],
    activity_any: tuple[Rule, ...],
) -> Plan:
    cancels = tuple((r, c) for r in rules for c in r.cancels if name in c.events)
    restarts = tuple(r for r in rules if name in r.restart_on)
    always: list[Entry] = []
    indexed: dict[str, dict[str, list[Entry]]] = {}
    for rule in rules:
        if rule.kind != EVENT or name not in rule.on:
            continue
        entry = (rule, rule.cond.fn if rule.cond is not None else None)
        key = dispatch_key(rule.cond.node) if rule.cond is not None else None
        if key is None:
            always.append(entry)
            continue
        prop, values = key
        table = indexed.setdefault(prop, {})
        for value in dict.fromkeys(values):
            table.setdefault(value, []).append(entry)
    dispatch = tuple(
        (prop, {v: tuple(e) for v, e in table.items()}) for prop, table in indexed.items()
    )
    activity = tuple(
        r for r in rules if r.kind == INACTIVE and r.activity is not None and name in r.activity
    )
    return Plan(
        track=name in tracked,
        keep=tracked.get(name),
        cancels=cancels,
        restarts=restarts,
        entries=tuple(always),
        dispatch=dispatch,
        activity=activity + activity_any,
        segments=bool(segments) and (seg_events is None or name in seg_events),
    )

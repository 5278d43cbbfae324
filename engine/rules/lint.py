"""Static checks of a rule set: mistakes that load fine but never do what was meant.

unknown-event      an event name no source is known to send (typo?)
unknown-property   event.X where X is not in the Segment spec for that event
unknown-field      email.X / consent.X that the profile does not have
overlap            rules entered the same way at the same priority: both may send
unreachable        a condition that can never hold (or an exit that always does)
window             a count or window the profile cannot see (beyond its recent events)
cap-blocks-step    a frequency cap that makes a flow step impossible (skip) or always late (defer)
holdout-all        a 100% holdout: nothing is ever delivered
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from engine.rules.compile import Expr
from engine.rules.durations import format_duration
from engine.rules.expr import Node
from engine.rules.model import ENTER, EVENT, INACTIVE, LEAVE, SKIP, Rule

ERROR, WARNING = "error", "warning"

SPEC_EVENTS = frozenset(
    {
        # Segment e-commerce spec v2
        "Products Searched",
        "Product List Viewed",
        "Product List Filtered",
        "Promotion Viewed",
        "Promotion Clicked",
        "Product Clicked",
        "Product Viewed",
        "Product Added",
        "Product Removed",
        "Cart Viewed",
        "Checkout Started",
        "Checkout Step Viewed",
        "Checkout Step Completed",
        "Payment Info Entered",
        "Order Updated",
        "Order Completed",
        "Order Refunded",
        "Order Cancelled",
        "Coupon Entered",
        "Coupon Applied",
        "Coupon Denied",
        "Coupon Removed",
        "Product Added to Wishlist",
        "Product Removed from Wishlist",
        "Wishlist Product Added to Cart",
        "Product Shared",
        "Cart Shared",
        "Product Reviewed",
        # pages, screens, email engagement and consent, accounts
        "Page Viewed",
        "Screen Viewed",
        "Email Delivered",
        "Email Opened",
        "Email Link Clicked",
        "Email Bounced",
        "Email Marked as Spam",
        "Unsubscribed",
        "Signed Up",
        "Signed In",
        # the other Segment calls, as rules name them
        "identify",
        "group",
        "alias",
    }
)
_PRODUCT = frozenset(
    {
        "product_id",
        "sku",
        "category",
        "name",
        "brand",
        "variant",
        "price",
        "quantity",
        "coupon",
        "position",
        "url",
        "image_url",
        "cart_id",
        "currency",
        "value",
    }
)
_ORDER = frozenset(
    {
        "order_id",
        "checkout_id",
        "affiliation",
        "total",
        "subtotal",
        "revenue",
        "shipping",
        "tax",
        "discount",
        "coupon",
        "currency",
        "products",
        "value",
    }
)
SPEC_PROPERTIES = {
    **{
        name: _PRODUCT
        for name in (
            "Product Viewed",
            "Product Clicked",
            "Product Added",
            "Product Removed",
            "Product Added to Wishlist",
            "Product Removed from Wishlist",
        )
    },
    **{
        name: _ORDER
        for name in (
            "Order Completed",
            "Order Updated",
            "Order Refunded",
            "Order Cancelled",
            "Checkout Started",
        )
    },
}
_DICT_FIELDS = {
    "email": {"opened", "clicked", "last_opened", "last_clicked"},
    "consent": {"unsubscribed", "unsubscribed_at"},
    "rfm": {"r", "f", "m", "score", "segment", "recency_days", "at", "k"},
}


@dataclass(frozen=True)
class Finding:
    """One lint result, pointing at `where` (source:line)."""

    level: str  # error | warning
    code: str
    message: str
    rule: str | None = None
    where: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.level}: {self.message} [{self.code}]"


def lint(
    ruleset: Any,
    *,
    known_events: set[str] | frozenset[str] | None = None,
    recent_max: int = 50,
    recent_days: float = 30.0,
) -> list[Finding]:
    """Every finding for `ruleset`, errors first, then by place.

    `known_events` replaces the default list (the Segment spec events); the
    profile limits say how far back window functions can see.
    """
    known = SPEC_EVENTS if known_events is None else frozenset(known_events)
    out: list[Finding] = []
    for rule in ruleset.rules:
        out += _events(rule, known)
        out += _properties(rule)
        out += _fields(rule)
        out += _reachability(rule, recent_max, recent_days)
        out += _caps(rule, ruleset.settings.caps)
        if rule.holdout >= 100:
            out.append(
                Finding(
                    WARNING,
                    "holdout-all",
                    f"rule {rule.name!r} holds out 100%: nothing is ever delivered",
                    rule.name,
                    rule.where,
                )
            )
    for segment in ruleset.segments:
        out += _expr_fields(f"segment {segment.name!r} if", segment.cond, None, segment.where)
        out += [
            Finding(
                f.level,
                f.code,
                f.message.replace("rule None", f"segment {segment.name!r}"),
                None,
                segment.where,
            )
            for f in _expr_reachability(
                None, "if", segment.cond, segment.where, recent_max, recent_days
            )
        ]
    out += _overlaps(ruleset.rules)
    return sorted(out, key=lambda f: (f.level != ERROR, *_place(f.where), f.code))


def _place(where: str) -> tuple[str, int]:
    source, _, line = where.rpartition(":")
    return (source, int(line)) if line.isdigit() else (where, 0)


def _events(rule: Rule, known: frozenset[str]) -> list[Finding]:
    named: list[tuple[str, str]] = [(n, "on") for n in rule.on]
    named += [(n, "restart_on") for n in rule.restart_on]
    named += [(n, "cancel_on") for c in rule.cancels for n in c.events]
    named += [(n, "activity") for n in (rule.activity or ())]
    wheres = {"on": rule.where}
    for label, expr in rule.expressions():
        named += [(n, label) for n in sorted(expr.refs.events)]
        wheres[label] = expr.where or rule.where
    out = []
    seen = set()
    for name, place in named:
        if name not in known and (name, place) not in seen:
            seen.add((name, place))
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "not a known event name"
            out.append(
                Finding(
                    WARNING,
                    "unknown-event",
                    f"rule {rule.name!r} {place}: unknown event {name!r} ({hint})",
                    rule.name,
                    wheres.get(place, rule.where),
                )
            )
    return out


def _properties(rule: Rule) -> list[Finding]:
    out = []
    entry_events = rule.on if rule.kind == EVENT else ()
    checks: list[tuple[str, Expr, tuple[str, ...], set[str]]] = []
    for label, expr in rule.expressions():
        if label.startswith("cancel_on"):
            index = int(label.split("[")[1].split("]")[0])
            checks.append((label, expr, rule.cancels[index].events, expr.refs.event_props))
            checks.append((label, expr, entry_events, expr.refs.trigger_props))
        else:
            checks.append(
                (label, expr, entry_events, expr.refs.event_props | expr.refs.trigger_props)
            )
    for label, expr, events, props in checks:
        for event in events:
            allowed = SPEC_PROPERTIES.get(event)
            if allowed is None:
                continue
            for prop in sorted(props - allowed):
                out.append(
                    Finding(
                        WARNING,
                        "unknown-property",
                        f"rule {rule.name!r} {label}: {event!r} has no standard property {prop!r}",
                        rule.name,
                        expr.where or rule.where,
                    )
                )
    return out


def _fields(rule: Rule) -> list[Finding]:
    out = []
    for label, expr in rule.expressions():
        out += _expr_fields(f"rule {rule.name!r} {label}", expr, rule.name, rule.where)
    return out


def _expr_fields(what: str, expr: Any, rule: str | None, where: str) -> list[Finding]:
    out = []
    for parent, name in expr.refs.fields:
        allowed = _DICT_FIELDS.get(parent)
        if allowed is not None and name not in allowed:
            out.append(
                Finding(
                    ERROR,
                    "unknown-field",
                    f"{what}: the profile's {parent} has no field {name!r} "
                    f"(it has {', '.join(sorted(allowed))})",
                    rule,
                    expr.where or where,
                )
            )
    return out


def _reachability(rule: Rule, recent_max: int, recent_days: float) -> list[Finding]:
    out = []
    for label, expr in rule.expressions():
        if label.startswith("payload") or ".payload." in label or label == "key":
            continue
        out += _expr_reachability(
            rule, label, expr, expr.where or rule.where, recent_max, recent_days
        )
    return out


def _expr_reachability(
    rule: Rule | None, label: str, expr: Expr, where: str, recent_max: int, recent_days: float
) -> list[Finding]:
    name = rule.name if rule is not None else None
    owner = f"rule {name!r}"
    out = []
    if expr.const:
        if label == "exit" and expr.value:
            out.append(
                Finding(
                    ERROR,
                    "unreachable",
                    f"{owner} exit is always true: nothing is ever sent",
                    name,
                    where,
                )
            )
        elif label != "exit" and not expr.value:
            out.append(
                Finding(ERROR, "unreachable", f"{owner} {label} can never be true", name, where)
            )
    for node in expr.node.walk():
        if node.kind == "and":
            problem = _contradiction(node)
            if problem:
                out.append(
                    Finding(ERROR, "unreachable", f"{owner} {label}: {problem}", name, where)
                )
        if node.kind == "compare" and node.args[0].kind == "call" and node.args[0].value == "count":
            limit = node.args[1].value if node.args[1].kind == "const" else None
            if isinstance(limit, (int, float)) and not isinstance(limit, bool):
                need = limit + 1 if node.value == ">" else limit
                if (
                    node.value in (">", ">=", "==")
                    and need > recent_max
                    and _windowed(node.args[0])
                ):
                    out.append(
                        Finding(
                            WARNING,
                            "window",
                            f"{owner} {label}: {node.text!r} needs {need:g} "
                            f"events but a profile keeps only the last {recent_max}",
                            name,
                            where,
                        )
                    )
        if node.kind == "call" and node.value in ("count", "purchased"):
            window = node.args[1] if len(node.args) > 1 else node.kwargs.get("within")
            if (
                window is not None
                and window.kind == "const"
                and isinstance(window.value, (int, float))
                and node.value == "count"
                and window.value > recent_days * 86400
            ):
                out.append(
                    Finding(
                        WARNING,
                        "window",
                        f"{owner} {label}: {node.text!r} looks back "
                        f"{format_duration(window.value)} but a profile keeps "
                        f"{recent_days:g} days of events",
                        name,
                        where,
                    )
                )
    return out


def _windowed(call: Node) -> bool:
    """True when count() reads the recent list (not the all-time counters)."""
    return len(call.args) > 1 or bool(call.kwargs)


def _contradiction(node: Node) -> str | None:
    """A reason the conjunction can never hold: disjoint bounds or two different equalities."""
    lows: dict[str, tuple[float, bool]] = {}
    highs: dict[str, tuple[float, bool]] = {}
    equals: dict[str, Any] = {}
    for part in node.args:
        if part.kind != "compare" or part.args[1].kind != "const" or part.args[0].kind == "const":
            continue
        subject, op, value = part.args[0].text, part.value, part.args[1].value
        if op == "==":
            if subject in equals and equals[subject] != value:
                return f"{subject} cannot equal both {equals[subject]!r} and {value!r}"
            equals[subject] = value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if op in (">", ">=", "=="):
            bound = (value, op == ">")
            if subject not in lows or bound > lows[subject]:
                lows[subject] = bound
        if op in ("<", "<=", "=="):
            bound = (value, op == "<")
            if subject not in highs or (bound[0], not bound[1]) < (
                highs[subject][0],
                not highs[subject][1],
            ):
                highs[subject] = bound
    for subject in lows.keys() & highs.keys():
        (low, low_open), (high, high_open) = lows[subject], highs[subject]
        if low > high or (low == high and (low_open or high_open)):
            return f"{subject} cannot be both above {low:g} and below {high:g}"
    return None


def _caps(rule: Rule, global_caps: tuple) -> list[Finding]:
    out = []
    offsets = []
    total = 0.0
    for step in rule.steps:
        total += step.wait
        offsets.append(total)
    for caps, scope in ((rule.caps, "the rule's"), (global_caps, "the global")):
        for cap in caps:
            if cap.max == 0:
                out.append(
                    Finding(
                        ERROR,
                        "cap-blocks-step",
                        f"rule {rule.name!r}: {scope} cap {cap} allows no send at all",
                        rule.name,
                        rule.where,
                    )
                )
                continue
            for j, at in enumerate(offsets):
                # A step with its own `if` may be skipped and send nothing: only
                # the steps that always send are sure to use the cap up.
                inside = [
                    i
                    for i in range(j + 1)
                    if offsets[i] > at - cap.per and (i == j or rule.steps[i].cond is None)
                ]
                if len(inside) <= cap.max:
                    continue
                steps = ", ".join(str(i + 1) for i in inside)
                if rule.on_cap == SKIP:
                    out.append(
                        Finding(
                            ERROR,
                            "cap-blocks-step",
                            f"rule {rule.name!r} step {j + 1} can never "
                            f"be sent: {scope} cap {cap} is used up by steps {steps}, all "
                            f"within {format_duration(cap.per)}",
                            rule.name,
                            rule.steps[j].where,
                        )
                    )
                else:
                    out.append(
                        Finding(
                            WARNING,
                            "cap-blocks-step",
                            f"rule {rule.name!r} step {j + 1} is always "
                            f"deferred by {scope} cap {cap} (steps {steps} fall within "
                            f"{format_duration(cap.per)})",
                            rule.name,
                            rule.steps[j].where,
                        )
                    )
    return out


def _entry_signature(rule: Rule) -> set[tuple]:
    if rule.kind == EVENT:
        return {("event", name) for name in rule.on}
    if rule.kind in (ENTER, LEAVE):
        return {(rule.kind, rule.segment)}
    assert rule.kind == INACTIVE
    return {("inactive",)}


def _overlaps(rules: tuple[Rule, ...]) -> list[Finding]:
    out = []
    for a, b in combinations(rules, 2):
        if a.priority != b.priority:
            continue
        shared = _entry_signature(a) & _entry_signature(b)
        if not shared:
            continue
        what = ", ".join(sorted(" ".join(str(x) for x in s[1:]) or s[0] for s in shared))
        out.append(
            Finding(
                WARNING,
                "overlap",
                f"rules {a.name!r} and {b.name!r} are both entered by {what} "
                f"at priority {a.priority}: a customer may get both; give one a higher priority",
                b.name,
                b.where,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """`nudge lint [FILE ...] [--known-events A,B] [--strict]`: exit 1 on errors."""
    from engine.errors import EngineError
    from engine.rules.files import STARTER, rule_sources
    from engine.rules.ruleset import RuleSet

    parser = argparse.ArgumentParser(prog="nudge lint", description="check a rule set")
    parser.add_argument(
        "files",
        nargs="*",
        help="config.toml or rule files, or 'starter' (default: the rules nudge serve "
        "would run: $NUDGE_CONFIG, else ./config.toml, else the starter rules)",
    )
    parser.add_argument(
        "--known-events",
        help="comma-separated event names your sources send (added to the Segment spec events)",
    )
    parser.add_argument("--strict", action="store_true", help="fail on warnings too")
    args = parser.parse_args(argv)
    files = args.files or [_served_config()]
    window: dict[str, Any] = {}
    try:
        sources = []
        for file in files:
            sources += rule_sources(STARTER if file == "starter" else file)
        ruleset = RuleSet.from_sources(sources)
        if len(files) == 1 and files[0] != "starter":
            # How far back a profile sees, as the engine with this config keeps it.
            from engine.config import file_settings

            engine, _ = file_settings(files[0])
            window = {"recent_max": engine.recent_max, "recent_days": engine.recent_window_days}
    except EngineError as exc:
        print(f"nudge lint: {exc.message}", file=sys.stderr)
        return 2
    known = set(SPEC_EVENTS)
    if args.known_events:
        known |= {name.strip() for name in args.known_events.split(",") if name.strip()}
    findings = lint(ruleset, known_events=known, **window)
    for finding in findings:
        print(finding)
    errors = sum(f.level == ERROR for f in findings)
    warnings = len(findings) - errors
    print(
        f"{len(ruleset.rules)} rules, {len(ruleset.segments)} segments: {errors} error(s), "
        f"{warnings} warning(s)"
    )
    return 1 if errors or (args.strict and warnings) else 0


def _served_config() -> str:
    """What `nudge serve` reads with no --config (engine.config.load): a path or 'starter'."""
    if os.environ.get("NUDGE_CONFIG"):
        return os.environ["NUDGE_CONFIG"]
    return "config.toml" if os.path.isfile("config.toml") else "starter"


__all__ = ["ERROR", "SPEC_EVENTS", "WARNING", "Finding", "lint", "main"]

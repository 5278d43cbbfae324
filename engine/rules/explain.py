"""Why a rule did or did not fire for one customer, with the values it saw."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from engine.rules.compile import Ctx, Expr
from engine.rules.expr import Node
from engine.rules.gates import cap_free_at, is_quiet
from engine.rules.model import ENTER, EVENT, INACTIVE, LEAVE, Rule


def iso(ts: float | None) -> str | None:
    """UTC ISO-8601 with a Z, to the second."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def explain_expr(expr: Expr, ctx: Ctx) -> dict:
    """The value of `expr` and, for each top-level `and` part, its value and the values it read.

    For `count("Product Viewed", 7d) >= 3 and not (event.product_id in cart)`
    seen with two views it gives, in part::

        {"expr": "count(...) >= 3", "passed": False, "seen": {"count(...)": 2}}
    """
    node = expr.node
    parts = node.args if node.kind == "and" else [node]
    out = []
    for part in parts:
        value = _safe(part, ctx)
        seen: dict[str, Any] = {}
        _seen(part, ctx, seen)
        out.append({"expr": part.text, "passed": bool(value), "value": _plain(value), "seen": seen})
    value = _safe(node, ctx)
    return {"expr": expr.text, "passed": bool(value), "parts": out}


def _safe(node: Node, ctx: Ctx) -> Any:
    try:
        return node.fn(ctx)
    except Exception as exc:  # explain must answer even about a rule that misbehaves
        return f"error: {exc}"


def _seen(node: Node, ctx: Ctx, out: dict) -> None:
    if node.kind == "compare":
        for side in node.args:
            if side.kind != "const":
                out[side.text] = _plain(_safe(side, ctx))
    elif node.kind in ("and", "or", "not"):
        for child in node.args:
            _seen(child, ctx, out)
    elif node.kind != "const":
        out[node.text] = _plain(_safe(node, ctx))


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in list(value.items())[:20]}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in list(value)[:20]]
    return repr(value)


def explain(ruleset: Any, profile: Any, now: float) -> list[dict]:
    """One dict per rule, highest priority first."""
    return [_rule(ruleset, rule, profile, now) for rule in ruleset.rules]


def _rule(ruleset: Any, rule: Rule, profile: Any, now: float) -> dict:
    journey = profile.journey
    running = journey.get("i", {}).get(rule.name, {})
    waiting = []
    for key, inst in sorted(running.items(), key=lambda kv: kv[1]["d"]):
        step = rule.steps[min(inst["n"], len(rule.steps) - 1)]
        entry = {
            "key": key,
            "instance": inst["id"],
            "step": inst["n"] + 1,
            "template": step.template,
            "due": inst["d"],
            "due_iso": iso(inst["d"]),
            "started": inst["s"],
            "deferrals": inst.get("x", 0),
        }
        if rule.exit is not None:
            ctx = Ctx(
                ruleset,
                profile,
                now,
                event=inst["t"],
                key=key,
                trigger=inst["t"],
                started=inst["s"],
            )
            entry["exit"] = explain_expr(rule.exit, ctx)
        waiting.append(entry)
    sends = [ts for ts, name in journey.get("h", ()) if name == rule.name]
    last = journey.get("o", {}).get(rule.name)
    if profile.suppressed:
        status = "blocked"
    elif waiting:
        status = "waiting"
    elif last is not None and last[1] in ("sent", "holdout"):
        status = "fired"
    elif last is not None and last[1] != "entered":
        status = last[1]
    else:
        status = "not triggered"
    return {
        "rule": rule.name,
        "priority": rule.priority,
        "where": rule.where,
        "entry": rule.describe_entry(),
        "status": status,
        "waiting": waiting,
        "sends": [{"at": ts, "at_iso": iso(ts)} for ts in sends],
        "last": None
        if last is None
        else {"at": last[0], "at_iso": iso(last[0]), "outcome": last[1], "detail": last[2]},
        "check": _entry_check(ruleset, rule, profile, now),
        "gates": _gates(ruleset, rule, profile, now),
    }


def _entry_check(ruleset: Any, rule: Rule, profile: Any, now: float) -> dict:
    journey = profile.journey
    if rule.kind == EVENT:
        seen = [
            (entry["ts"], name, entry)
            for name in rule.on
            if (entry := journey.get("last", {}).get(name)) is not None
        ]
        if not seen:
            return {
                "event": None,
                "passed": False,
                "reason": f"no {' or '.join(rule.on)} event seen since these rules were loaded",
            }
        ts, name, entry = max(seen, key=lambda s: s[0])
        props = {k: v for k, v in entry.items() if k != "ts"}
        check: dict[str, Any] = {"event": name, "at": ts, "at_iso": iso(ts), "properties": props}
        if rule.cond is None:
            check["passed"] = True
        else:
            # as the rule saw it: at that event's time, with its properties
            result = explain_expr(rule.cond, Ctx(ruleset, profile, ts, event=props, name=name))
            check.update(passed=result["passed"], condition=result)
        return check
    if rule.kind in (ENTER, LEAVE):
        segment = next(s for s in ruleset.segments if s.name == rule.segment)
        member = rule.segment in (journey.get("seg") or ())
        result = explain_expr(segment.cond, Ctx(ruleset, profile, now))
        return {
            "segment": rule.segment,
            "member": member,
            "passed": member == (rule.kind == ENTER),
            "condition": result,
        }
    assert rule.kind == INACTIVE
    deadline = journey.get("idle", {}).get(rule.name)
    check = {
        "idle_until": deadline,
        "idle_until_iso": iso(deadline),
        "passed": deadline is not None and deadline <= now,
    }
    if rule.cond is not None:
        check["condition"] = explain_expr(rule.cond, Ctx(ruleset, profile, now))
    return check


def _gates(ruleset: Any, rule: Rule, profile: Any, now: float) -> dict:
    journey = profile.journey
    history = journey.get("h", ())
    quiet = rule.quiet is not None and is_quiet(ruleset.local_time(profile, now), rule.quiet)
    free_rule = cap_free_at(history, rule.caps, now, rule.name) if rule.caps else None
    free_all = (
        cap_free_at(history, ruleset.settings.caps, now, None) if ruleset.settings.caps else None
    )
    return {
        "consent": "unsubscribed" if profile.suppressed else "ok",
        "quiet_hours_now": quiet,
        "timezone": str(ruleset.zone(profile)),
        "rule_cap_free_at": iso(free_rule) if free_rule not in (None, float("inf")) else free_rule,
        "global_cap_free_at": iso(free_all) if free_all not in (None, float("inf")) else free_all,
        "suppressed_by": ruleset._suppressor(journey, rule, now) if rule.suppressible else None,
    }

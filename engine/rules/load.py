"""Read rule TOML: validate every table and key, compile every expression.

Errors are RuleError with `source:line` (and the column inside an expression),
raised at the first problem found.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable
from typing import Any

from engine.rules.compile import Expr, Scope, compile_expr
from engine.rules.durations import Cap, parse_cap, parse_duration, parse_quiet_hours
from engine.rules.errors import RuleError
from engine.rules.expr import ExprError
from engine.rules.locate import Locator
from engine.rules.model import (
    DEFER,
    ENTER,
    EVENT,
    INACTIVE,
    LEAVE,
    SKIP,
    Cancel,
    Rule,
    Segment,
    Settings,
    Step,
)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_SETTINGS_KEYS = {
    "suppression",
    "caps",
    "on_cap",
    "quiet_hours",
    "timezone",
    "expires",
    "reentry",
    "dir",
    "files",
}
_SEGMENT_KEYS = {"if", "description"}
_RULE_KEYS = {
    "name",
    "description",
    "enabled",
    "priority",
    "on",
    "enter_segment",
    "leave_segment",
    "inactive_for",
    "activity",
    "if",
    "key",
    "restart_on",
    "cancel_on",
    "exit",
    "reentry",
    "expires",
    "caps",
    "on_cap",
    "quiet_hours",
    "suppress",
    "esp",
    "experiment",
    "holdout",
    "variants",
    "payload",
    "blocks",
    "max_instances",
    "step",
}
_STEP_KEYS = {"wait", "template", "if", "payload", "blocks", "esp"}
_ENTRY_KEYS = ("on", "enter_segment", "leave_segment", "inactive_for")


class _Doc:
    """One parsed source with its locator, for error messages."""

    def __init__(self, text: str, source: str):
        self.source = source
        try:
            self.data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            match = re.search(r"\(at line (\d+), column (\d+)\)", message)
            line = int(match.group(1)) if match else None
            message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
            column = f" (column {match.group(2)})" if match else ""
            raise RuleError(f"invalid TOML: {message}{column}", source=source, line=line) from None
        self.loc = Locator(text, source)

    def error(self, path: tuple, message: str) -> RuleError:
        return RuleError(message, source=self.source, line=self.loc.line(path), field=_dotted(path))

    def where(self, path: tuple) -> str:
        return self.loc.where(path)


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def load(sources: Iterable[tuple[str, str]]) -> tuple[Settings, list[Segment], list[Rule]]:
    """Settings, segments and rules from (text, source) pairs, validated and compiled."""
    docs = [_Doc(text, source) for text, source in sources]
    settings = _settings(docs)
    raw_segments: list[tuple[_Doc, str, Any]] = []
    seen_segments: dict[str, str] = {}
    for doc in docs:
        table = doc.data.get("segment", {})
        if not isinstance(table, dict):
            raise doc.error(("segment",), "segment must be a table of [segment.NAME] tables")
        for name, spec in table.items():
            if name in seen_segments:
                raise doc.error(
                    ("segment", name),
                    f"segment {name!r} is defined twice (also at {seen_segments[name]})",
                )
            seen_segments[name] = doc.where(("segment", name))
            raw_segments.append((doc, name, spec))
    names = frozenset(seen_segments)
    segments = [_segment(doc, name, spec) for doc, name, spec in raw_segments]
    rules: list[Rule] = []
    seen_rules: dict[str, str] = {}
    for doc in docs:
        table = doc.data.get("rule", [])
        if not isinstance(table, list):
            raise doc.error(("rule",), "rules are written as [[rule]] tables")
        for index, spec in enumerate(table):
            rule = _rule(doc, index, spec, settings, names, order=len(rules) + len(seen_rules))
            if rule is None:
                continue
            if rule.name in seen_rules:
                raise doc.error(
                    ("rule", index, "name"),
                    f"rule {rule.name!r} is defined twice (also at {seen_rules[rule.name]})",
                )
            seen_rules[rule.name] = rule.where
            rules.append(rule)
    return settings, segments, rules


# -- typed field readers ----------------------------------------------------------------
def _check_keys(doc: _Doc, path: tuple, table: Any, allowed: set[str], what: str) -> dict:
    if not isinstance(table, dict):
        raise doc.error(path, f"{what} must be a table")
    for key in table:
        if key not in allowed:
            import difflib

            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = (
                f"; did you mean '{close[0]}'?"
                if close
                else f" (known: {', '.join(sorted(allowed))})"
            )
            raise doc.error((*path, key), f"unknown key '{key}' in {what}{hint}")
    return table


def _str(doc: _Doc, path: tuple, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise doc.error(
            path, f"{_dotted(path[-1:])} must be a {'' if empty else 'non-empty '}string"
        )
    return value


def _names(doc: _Doc, path: tuple, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise doc.error(path, f"{path[-1]} must be an event name or a list of event names")
    return tuple(value)


def _duration(doc: _Doc, path: tuple, value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise doc.error(path, f"{path[-1]}: {exc}") from None


def _caps(doc: _Doc, path: tuple, value: Any) -> tuple[Cap, ...]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise doc.error(path, 'caps must be a list such as ["2/1d", "5/7d"]')
    out = []
    for i, item in enumerate(value):
        try:
            out.append(parse_cap(item))
        except ValueError as exc:
            raise doc.error((*path, i), f"caps: {exc}") from None
    return tuple(out)


def _on_cap(doc: _Doc, path: tuple, value: Any) -> str:
    if value not in (SKIP, DEFER):
        raise doc.error(path, "on_cap must be 'skip' or 'defer'")
    return value


def _quiet(doc: _Doc, path: tuple, value: Any) -> tuple[int, int] | None:
    try:
        return parse_quiet_hours(value)
    except ValueError as exc:
        raise doc.error(path, f"quiet_hours: {exc}") from None


def _timezone(doc: _Doc, path: tuple, value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    name = _str(doc, path, value)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise doc.error(
            path, f"unknown time zone {name!r} (use an IANA name such as 'Europe/Paris')"
        ) from None
    return name


def _expr(doc: _Doc, path: tuple, value: Any, scope: Scope, what: str) -> Expr:
    text = _str(doc, path, value)
    try:
        expr = compile_expr(text, scope)
        expr.where = doc.where(path)
        return expr
    except ExprError as exc:
        line = doc.loc.line(path) or 0
        if doc.loc.exact((*path, "@text")) is not None:
            line += 1  # a multi-line string starts on the line after its key
        before = text[: exc.offset]
        line += before.count("\n")
        column = exc.offset - (before.rfind("\n") + 1) + 1
        snippet = text.split("\n")[before.count("\n")]
        raise RuleError(
            f"{what}: {exc.message} (column {column} of {snippet.strip()!r})",
            source=doc.source,
            line=line or None,
            field=_dotted(path),
        ) from None


# -- sections ----------------------------------------------------------------------------
def _settings(docs: list[_Doc]) -> Settings:
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for doc in docs:
        if "rules" not in doc.data:
            continue
        table = _check_keys(doc, ("rules",), doc.data["rules"], _SETTINGS_KEYS, "[rules]")
        for key, value in table.items():
            path = ("rules", key)
            if key in where:
                raise doc.error(path, f"rules.{key} is set twice (also at {where[key]})")
            where[key] = doc.where(path)
            if key in ("suppression", "expires"):
                values[key] = _duration(doc, path, value)
            elif key == "reentry":
                values[key] = _reentry(doc, path, value)
            elif key == "caps":
                values[key] = _caps(doc, path, value)
            elif key == "on_cap":
                values[key] = _on_cap(doc, path, value)
            elif key == "quiet_hours":
                values[key] = _quiet(doc, path, value)
            elif key == "timezone":
                values[key] = _timezone(doc, path, value)
            elif key == "dir":
                values[key] = _str(doc, path, value)
            elif key == "files":
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise doc.error(path, "rules.files must be a list of paths")
                values[key] = tuple(value)
    return Settings(**values, where=where)


def _reentry(doc: _Doc, path: tuple, value: Any) -> float:
    if value == "once":
        return math.inf
    if value == "always":
        return 0.0
    try:
        return parse_duration(value)
    except ValueError:
        raise doc.error(
            path, "reentry must be 'once', 'always' or a duration such as '1h'"
        ) from None


def _segment(doc: _Doc, name: str, spec: Any) -> Segment:
    path = ("segment", name)
    if not _NAME.match(name):
        raise doc.error(path, f"segment name {name!r} may use letters, digits, '_', '-' and '.'")
    _check_keys(doc, path, spec, _SEGMENT_KEYS, f"segment {name!r}")
    if "if" not in spec:
        raise doc.error(path, f"segment {name!r} needs an 'if' condition")
    scope = Scope(event=False, event_only=False, instance=False, segments=frozenset())
    cond = _expr(doc, (*path, "if"), spec["if"], scope, f"segment {name!r} if")
    description = _str(doc, (*path, "description"), spec.get("description", ""), empty=True)
    return Segment(name, cond, description, doc.where(path))


def _payload(
    doc: _Doc, path: tuple, value: Any, scope: Scope, label: str
) -> tuple[tuple[str, Expr], ...]:
    if not isinstance(value, dict):
        raise doc.error(path, f'{label} must be a table of name = "expression"')
    out = []
    for name, text in value.items():
        out.append((name, _expr(doc, (*path, name), text, scope, f"{label}.{name}")))
    return tuple(out)


def _blocks(doc: _Doc, path: tuple, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise doc.error(path, "blocks must be a list of content block names")
    return tuple(value)


def _rule(
    doc: _Doc, index: int, spec: Any, settings: Settings, segments: frozenset[str], *, order: int
) -> Rule | None:
    path = ("rule", index)
    _check_keys(doc, path, spec, _RULE_KEYS, "a [[rule]]")
    if "name" not in spec:
        raise doc.error(path, "a [[rule]] needs a name")
    name = _str(doc, (*path, "name"), spec["name"])
    if not _NAME.match(name):
        raise doc.error(
            (*path, "name"), f"rule name {name!r} may use letters, digits, '_', '-' and '.'"
        )
    label = f"rule {name!r}"
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise doc.error((*path, "enabled"), "enabled must be true or false")
    if not enabled:
        return None

    entries = [k for k in _ENTRY_KEYS if k in spec]
    if len(entries) != 1:
        found = ", ".join(entries) if entries else "none"
        raise doc.error(
            path,
            f"{label} needs exactly one entry: on, enter_segment, leave_segment or "
            f"inactive_for (found {found})",
        )
    entry = entries[0]
    kw: dict[str, Any] = {}
    if entry == "on":
        kind = EVENT
        kw["on"] = _names(doc, (*path, "on"), spec["on"])
    elif entry in ("enter_segment", "leave_segment"):
        kind = ENTER if entry == "enter_segment" else LEAVE
        segment = _str(doc, (*path, entry), spec[entry])
        if segment not in segments:
            known = ", ".join(sorted(segments)) or "none are defined"
            raise doc.error((*path, entry), f"{label}: unknown segment {segment!r} ({known})")
        kw["segment"] = segment
    else:
        kind = INACTIVE
        kw["idle"] = _duration(doc, (*path, "inactive_for"), spec["inactive_for"])
        if kw["idle"] <= 0:
            raise doc.error((*path, "inactive_for"), "inactive_for must be longer than 0s")
    if "activity" in spec:
        if kind != INACTIVE:
            raise doc.error((*path, "activity"), "activity only applies with inactive_for")
        kw["activity"] = _names(doc, (*path, "activity"), spec["activity"])

    has_event = kind != INACTIVE
    entry_scope = Scope(event=has_event, event_only=has_event, instance=False, segments=segments)
    # inside an instance `event` is the event that started it (none for inactivity)
    step_scope = Scope(event=has_event, event_only=False, instance=True, segments=segments)
    cancel_scope = Scope(event=True, event_only=True, instance=True, segments=segments)
    if "if" in spec:
        kw["cond"] = _expr(doc, (*path, "if"), spec["if"], entry_scope, f"{label} if")
    if "key" in spec:
        kw["key"] = _expr(doc, (*path, "key"), spec["key"], entry_scope, f"{label} key")
    if "restart_on" in spec:
        kw["restart_on"] = _names(doc, (*path, "restart_on"), spec["restart_on"])
    if "cancel_on" in spec:
        kw["cancels"] = _cancels(doc, (*path, "cancel_on"), spec["cancel_on"], cancel_scope, label)
    if "exit" in spec:
        kw["exit"] = _expr(doc, (*path, "exit"), spec["exit"], step_scope, f"{label} exit")
    kw["reentry"] = (
        _reentry(doc, (*path, "reentry"), spec["reentry"])
        if "reentry" in spec
        else settings.reentry
    )
    kw["expires"] = (
        _duration(doc, (*path, "expires"), spec["expires"])
        if "expires" in spec
        else settings.expires
    )
    if "caps" in spec:
        kw["caps"] = _caps(doc, (*path, "caps"), spec["caps"])
    kw["on_cap"] = (
        _on_cap(doc, (*path, "on_cap"), spec["on_cap"]) if "on_cap" in spec else settings.on_cap
    )
    kw["quiet"] = (
        _quiet(doc, (*path, "quiet_hours"), spec["quiet_hours"])
        if "quiet_hours" in spec
        else settings.quiet_hours
    )
    for key, field_name in (("suppress", "suppressible"),):
        if key in spec:
            if not isinstance(spec[key], bool):
                raise doc.error((*path, key), f"{key} must be true or false")
            kw[field_name] = spec[key]
    priority = spec.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise doc.error((*path, "priority"), "priority must be a whole number (higher wins)")
    if "esp" in spec:
        kw["esp"] = _str(doc, (*path, "esp"), spec["esp"])
    kw["experiment"] = (
        _str(doc, (*path, "experiment"), spec["experiment"]) if "experiment" in spec else name
    )
    _variants(doc, path, spec, kw)
    if "payload" in spec:
        kw["payload"] = _payload(
            doc, (*path, "payload"), spec["payload"], step_scope, f"{label} payload"
        )
    if "blocks" in spec:
        kw["blocks"] = _blocks(doc, (*path, "blocks"), spec["blocks"])
    if "max_instances" in spec:
        value = spec["max_instances"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise doc.error(
                (*path, "max_instances"), "max_instances must be a whole number from 1 to 1000"
            )
        kw["max_instances"] = value
    description = _str(doc, (*path, "description"), spec.get("description", ""), empty=True)

    raw_steps = spec.get("step")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise doc.error(path, f"{label} needs at least one [[rule.step]] with a template")
    steps = tuple(
        _step(
            doc,
            (*path, "step", i),
            i,
            raw,
            step_scope,
            label,
            bool(kw.get("variants") or kw.get("holdout")),
        )
        for i, raw in enumerate(raw_steps)
    )
    kw["keep"] = _kept_properties(kw, steps)
    return Rule(
        name=name,
        kind=kind,
        steps=steps,
        order=order,
        priority=priority,
        description=description,
        where=doc.where(path),
        source=doc.source,
        **kw,
    )


def _cancels(doc: _Doc, path: tuple, value: Any, scope: Scope, label: str) -> tuple[Cancel, ...]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise doc.error(path, "cancel_on must be a list of event names or {event, if} tables")
    out = []
    for i, item in enumerate(value):
        here = (*path, i)
        if isinstance(item, str):
            out.append(Cancel((item,), None, doc.where(here)))
            continue
        _check_keys(doc, here, item, {"event", "if"}, "a cancel_on entry")
        if "event" not in item:
            raise doc.error(here, "a cancel_on entry needs an event")
        events = _names(doc, (*here, "event"), item["event"])
        cond = (
            _expr(doc, (*here, "if"), item["if"], scope, f"{label} cancel_on if")
            if "if" in item
            else None
        )
        out.append(Cancel(events, cond, doc.where(here)))
    return tuple(out)


def _variants(doc: _Doc, path: tuple, spec: dict, kw: dict) -> None:
    if "holdout" in spec:
        value = spec["holdout"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise doc.error((*path, "holdout"), "holdout is a percentage from 0 to 100")
        kw["holdout"] = float(value)
    if "variants" not in spec:
        return
    value = spec["variants"]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value) and value:
        pairs = [(v, 1.0) for v in value]
    elif isinstance(value, dict) and value:
        pairs = []
        for name, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise doc.error(
                    (*path, "variants", name), f"variant {name!r} needs a positive weight"
                )
            pairs.append((name, float(weight)))
    else:
        raise doc.error(
            (*path, "variants"), "variants must be a list of names or a table of name = weight"
        )
    for name, _ in pairs:
        if name == "holdout" or not _NAME.match(name):
            raise doc.error((*path, "variants"), f"variant name {name!r} is not allowed")
    if len({n for n, _ in pairs}) != len(pairs):
        raise doc.error((*path, "variants"), "variant names must be unique")
    kw["variants"] = tuple(pairs)


def _step(
    doc: _Doc, path: tuple, index: int, raw: Any, scope: Scope, label: str, has_variants: bool
) -> Step:
    _check_keys(doc, path, raw, _STEP_KEYS, f"{label} step {index + 1}")
    if "template" not in raw:
        raise doc.error(path, f"{label} step {index + 1} needs a template")
    template = _str(doc, (*path, "template"), raw["template"])
    if "{variant}" in template and not has_variants:
        raise doc.error(
            (*path, "template"),
            f"{label} step {index + 1}: the template uses {{variant}} but the rule has no variants",
        )
    wait = _duration(doc, (*path, "wait"), raw.get("wait", 0))
    where = doc.where(path)
    what = f"{label} step {index + 1}"
    cond = _expr(doc, (*path, "if"), raw["if"], scope, f"{what} if") if "if" in raw else None
    payload = (
        _payload(doc, (*path, "payload"), raw["payload"], scope, f"{what} payload")
        if "payload" in raw
        else ()
    )
    blocks = _blocks(doc, (*path, "blocks"), raw["blocks"]) if "blocks" in raw else None
    esp = _str(doc, (*path, "esp"), raw["esp"]) if "esp" in raw else None
    return Step(index, wait, template, cond, payload, blocks, esp, where)


def _kept_properties(kw: dict, steps: tuple[Step, ...]) -> frozenset[str] | None:
    """Trigger-event properties a running instance still reads (None: all of them)."""
    keep: set[str] = set()
    inside: list[Expr] = [e for e in (kw.get("exit"),) if e is not None]
    inside += [expr for _, expr in kw.get("payload", ())]
    for step in steps:
        inside += [step.cond] if step.cond is not None else []
        inside += [expr for _, expr in step.payload]
    for expr in inside:
        if expr.refs.event_whole or expr.refs.trigger_whole:
            return None
        keep |= expr.refs.event_props | expr.refs.trigger_props
    for cancel in kw.get("cancels", ()):
        if cancel.cond is not None:
            if cancel.cond.refs.trigger_whole:
                return None
            keep |= cancel.cond.refs.trigger_props
    return frozenset(keep)

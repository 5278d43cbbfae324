"""Turn parsed expressions into plain Python closures, checking every name once.

Each node becomes `fn(ctx) -> value`. Constant sub-expressions are folded at
load time. Nothing is ever passed to eval(): the only names a condition can
reach are the profile fields, the bindings below and `functions.FUNCTIONS`.

Null-safe by design: a missing field is null, field access on null is null,
arithmetic with null is null, and an ordering comparison (<, <=, >, >=) with
null or with mismatched types is false.
"""

from __future__ import annotations

import difflib
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.rules.expr import ExprError, Node, parse
from engine.rules.functions import FUNCTIONS, Arg, ArgError

log = logging.getLogger(__name__)

Fn = Callable[[Any], Any]

# Profile fields a rule may read (bookkeeping such as `seen` and `journey` stays hidden).
PROFILE_FIELDS = frozenset(
    {
        "id",
        "anonymous",
        "traits",
        "counts",
        "first_seen",
        "last_seen",
        "recent",
        "cart",
        "cart_id",
        "cart_updated",
        "orders",
        "revenue",
        "last_order_at",
        "last_order_id",
        "purchased",
        "email",
        "consent",
        "timezone",
        "groups",
        "merged_ids",
        "rfm",
        "scores",
    }
)
# Bindings and where they exist: "event" where there is an event (entry, cancel, steps),
# "instance" inside a running trigger instance (cancel, exit, steps, payload).
BINDINGS = {
    "event": "event",
    "event_name": "event_only",
    "trigger": "instance",
    "key": "instance",
    "started": "instance",
    "now": None,
    "customer": None,
    "profile": None,
}


class Ctx:
    """What an expression sees: profile, event properties, time, instance."""

    __slots__ = ("ev", "j", "key", "memo", "name", "now", "p", "rs", "started", "trig")

    def __init__(
        self,
        rs: Any,
        profile: Any,
        now: float,
        event: dict | None = None,
        name: str | None = None,
        key: str | None = None,
        trigger: dict | None = None,
        started: float | None = None,
    ):
        self.rs = rs
        self.p = profile
        self.j = profile.journey
        self.now = now
        self.ev = _NO_PROPS if event is None else event
        self.name = name
        self.key = key
        self.trig = _NO_PROPS if trigger is None else trigger
        self.started = started
        self.memo: dict | None = None  # per-event cache of window counts


_NO_PROPS: dict = {}  # shared: expressions only read `event` and `trigger`


@dataclass(frozen=True)
class Scope:
    """Which bindings an expression may use, and the segments that exist."""

    event: bool = True  # `event` is available
    event_only: bool = True  # `event` is the current event (so event_name exists)
    instance: bool = False  # trigger, key, started
    segments: frozenset[str] = frozenset()


@dataclass
class Refs:
    """What an expression reads, for storage decisions and lint."""

    event_props: set[str] = field(default_factory=set)
    event_whole: bool = False  # `event` used as a whole: keep every property
    trigger_props: set[str] = field(default_factory=set)
    trigger_whole: bool = False
    last: dict[str, set[str] | None] = field(default_factory=dict)  # None: all properties
    events: set[str] = field(default_factory=set)  # event names given to count()/last()
    names: set[str] = field(default_factory=set)  # profile fields and bindings used
    calls: set[str] = field(default_factory=set)  # functions called
    fields: list[tuple[str, str]] = field(default_factory=list)  # (dict field, key) e.g. email.opnd


@dataclass(eq=False)
class Expr:
    """A compiled expression: call `fn(ctx)`; `node` keeps the tree for explain and lint."""

    text: str
    node: Node
    fn: Fn
    refs: Refs
    const: bool = False
    value: Any = None
    where: str = ""  # source:line, set by the loader

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


_NOTHING = object()


def compile_expr(text: str, scope: Scope) -> Expr:
    """Parse and compile `text`; raises ExprError with an offset into `text`."""
    node = parse(text)
    refs = Refs()
    fn, const = _Compiler(scope, refs).compile(node)
    return Expr(text, node, fn, refs, const is not _NOTHING, None if const is _NOTHING else const)


# What odd client data can still raise deep in a function call: the call is null
# there (and the expression around it goes on by the null rules), never a failed
# event, which stopped every rule of the customer, each later event failing again
# on the same stored trigger properties.
_DATA_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError)
_reported: set[str] = set()


def _null_on_error(fn: Fn, text: str) -> Fn:
    def null_on_error(c: Any) -> Any:
        try:
            return fn(c)
        except _DATA_ERRORS as exc:
            if text not in _reported and len(_reported) < 1000:
                _reported.add(text)
                log.warning("rule expression %r counts as null on this data: %r", text, exc)
            return None

    return null_on_error


def _constant(value: Any) -> Fn:
    return lambda c: value


# -- runtime helpers (null-safe semantics) ----------------------------------------------
def _get(value: Any, key: Any) -> Any:
    if isinstance(value, dict):
        if isinstance(key, (list, dict)):
            return None  # unhashable: no such key
        got = value.get(key)
        if got is None and not isinstance(key, str) and key is not None:
            got = value.get(str(key))
        return got
    if isinstance(value, list) and isinstance(key, int) and not isinstance(key, bool):
        return value[key] if -len(value) <= key < len(value) else None
    return None


def _loose_eq(a: Any, b: Any) -> bool:
    """Equality that lets product id 42 match "42" (ids arrive as either)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, int) and not isinstance(b, bool):
        return a == str(b)
    if isinstance(b, str) and isinstance(a, int) and not isinstance(a, bool):
        return b == str(a)
    return False


def _contains(container: Any, item: Any) -> bool:
    if container is None or item is None:
        return False
    if isinstance(container, dict):
        return (item if isinstance(item, str) else str(item)) in container
    if isinstance(container, list):
        return item in container or (not isinstance(item, str) and str(item) in container)
    if isinstance(container, str):
        return isinstance(item, str) and item in container
    return False


def _order(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(a: Any, b: Any) -> bool:
        if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
            return False
        try:
            return op(a, b)
        except TypeError:
            return False

    return compare


_COMPARE = {
    "==": _loose_eq,
    "!=": lambda a, b: not _loose_eq(a, b),
    "<": _order(operator.lt),
    "<=": _order(operator.le),
    ">": _order(operator.gt),
    ">=": _order(operator.ge),
    "in": lambda a, b: _contains(b, a),
    "not in": lambda a, b: not _contains(b, a),
}


_NUMBERS = frozenset({int, float})  # not bool (a subclass of int, by class here)


def _arith(op: str) -> Callable[[Any, Any], Any]:
    fn = {
        "+": operator.add,
        "-": operator.sub,
        "*": operator.mul,
        "/": operator.truediv,
        "%": operator.mod,
    }[op]

    def arith(a: Any, b: Any) -> Any:
        # Numbers, or (for +) two strings: a client's list times a big number would
        # allocate without end, and lists or objects add nothing a rule needs.
        numbers = a.__class__ in _NUMBERS and b.__class__ in _NUMBERS
        if not numbers and not (op == "+" and a.__class__ is str and b.__class__ is str):
            return None
        try:
            return fn(a, b)
        except (TypeError, ZeroDivisionError, ValueError, OverflowError):
            return None

    return arith


class _Compiler:
    def __init__(self, scope: Scope, refs: Refs):
        self.scope = scope
        self.refs = refs

    def compile(self, node: Node) -> tuple[Fn, Any]:
        fn, const = getattr(self, "_" + node.kind)(node)
        if const is not _NOTHING:
            fn = _constant(const)
            node.folded, node.constant = True, const
        elif node.kind == "call":
            fn = _null_on_error(fn, node.text)
        node.fn = fn  # explain evaluates sub-expressions through these
        return fn, const

    def fail(self, node: Node, message: str) -> ExprError:
        return ExprError(message, node.start)

    # -- leaves ---------------------------------------------------------------
    def _const(self, node: Node) -> tuple[Fn, Any]:
        return _constant(node.value), node.value

    def _list(self, node: Node) -> tuple[Fn, Any]:
        parts = [self.compile(child) for child in node.args]
        if all(const is not _NOTHING for _, const in parts):
            return _constant(None), [const for _, const in parts]
        fns = [fn for fn, _ in parts]
        return (lambda c: [f(c) for f in fns]), _NOTHING

    def _name(self, node: Node) -> tuple[Fn, Any]:
        name = node.value
        scope = self.scope
        if name in BINDINGS:
            needs = BINDINGS[name]
            if needs == "event" and not scope.event:
                raise self.fail(node, "'event' is not available here (there is no event)")
            if needs == "event_only" and not scope.event_only:
                raise self.fail(
                    node, "'event_name' is only available where an event is being handled"
                )
            if needs == "instance" and not scope.instance:
                raise self.fail(
                    node,
                    f"'{name}' is only available once a rule has been entered "
                    "(in cancel_on, exit, steps and payload)",
                )
            self.refs.names.add(name)
            if name == "event":
                self.refs.event_whole = True  # narrowed by _attr when followed by .field
                return (lambda c: c.ev), _NOTHING
            if name == "trigger":
                self.refs.trigger_whole = True
                return (lambda c: c.trig), _NOTHING
            getter = {
                "event_name": lambda c: c.name,
                "key": lambda c: c.key,
                "started": lambda c: c.started,
                "now": lambda c: c.now,
                "customer": lambda c: c.p.id,
                "profile": lambda c: c.p,
            }[name]
            return getter, _NOTHING
        if name in PROFILE_FIELDS:
            self.refs.names.add(name)
            return _profile_field(name), _NOTHING
        if name in FUNCTIONS:
            raise self.fail(node, f"{name} is a function: call it as {name}(...)")
        known = sorted(PROFILE_FIELDS | set(BINDINGS))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
        raise self.fail(node, f"unknown name '{name}'{hint}")

    # -- access -------------------------------------------------------------------
    def _attr(self, node: Node) -> tuple[Fn, Any]:
        target = node.args[0]
        name = node.value
        if target.kind == "name" and target.value == "profile":
            if name not in PROFILE_FIELDS:
                raise self.fail(node, f"the profile has no field '{name}'")
            target.fn = lambda c: c.p
            self.refs.names.add(name)
            return _profile_field(name), _NOTHING
        if target.kind == "name" and target.value in ("event", "trigger"):
            was_whole = (self.refs.event_whole, self.refs.trigger_whole)
            inner, _ = self.compile(target)
            # reading one property does not need the whole event kept
            self.refs.event_whole, self.refs.trigger_whole = was_whole
            if target.value == "event":
                self.refs.event_props.add(name)
                return (lambda c: c.ev.get(name)), _NOTHING
            self.refs.trigger_props.add(name)
            return (lambda c: c.trig.get(name)), _NOTHING
        if (
            target.kind == "call"
            and target.value == "last"
            and target.args
            and isinstance(target.args[0].value, str)
        ):
            wanted = self.refs.last.setdefault(target.args[0].value, set())
            if wanted is not None:
                wanted.add(name)
            target.in_attr = True
            inner, _ = self.compile(target)
        else:
            inner, const = self.compile(target)
            if const is not _NOTHING:
                return _constant(None), _get(const, name)
            if target.kind == "name":
                self.refs.fields.append((target.value, name))
            elif (
                target.kind == "attr"
                and target.args[0].kind == "name"
                and target.args[0].value == "profile"
            ):
                self.refs.fields.append((target.value, name))  # profile.email.opened

        def attr(c: Any) -> Any:
            value = inner(c)
            return value.get(name) if isinstance(value, dict) else None

        return attr, _NOTHING

    def _index(self, node: Node) -> tuple[Fn, Any]:
        if node.args[0].kind == "name" and node.args[0].value == "event":
            self.refs.event_whole = True
        target, tconst = self.compile(node.args[0])
        key, kconst = self.compile(node.args[1])
        if tconst is not _NOTHING and kconst is not _NOTHING:
            return _constant(None), _get(tconst, kconst)
        if kconst is not _NOTHING:
            return (lambda c: _get(target(c), kconst)), _NOTHING
        return (lambda c: _get(target(c), key(c))), _NOTHING

    # -- operators -------------------------------------------------------------------
    def _not(self, node: Node) -> tuple[Fn, Any]:
        inner, const = self.compile(node.args[0])
        if const is not _NOTHING:
            return _constant(None), not const
        return (lambda c: not inner(c)), _NOTHING

    def _neg(self, node: Node) -> tuple[Fn, Any]:
        inner, const = self.compile(node.args[0])
        neg = _arith("-")
        if const is not _NOTHING:
            return _constant(None), neg(0, const)
        return (lambda c: neg(0, inner(c))), _NOTHING

    def _arith(self, node: Node) -> tuple[Fn, Any]:
        (left, lc), (right, rc) = self.compile(node.args[0]), self.compile(node.args[1])
        op = _arith(node.value)
        if lc is not _NOTHING and rc is not _NOTHING:
            return _constant(None), op(lc, rc)
        if rc is not _NOTHING:
            return (lambda c: op(left(c), rc)), _NOTHING
        return (lambda c: op(left(c), right(c))), _NOTHING

    def _compare(self, node: Node) -> tuple[Fn, Any]:
        (left, lc), (right, rc) = self.compile(node.args[0]), self.compile(node.args[1])
        op = node.value
        test = _COMPARE[op]
        if lc is not _NOTHING and rc is not _NOTHING:
            return _constant(None), test(lc, rc)
        if rc is not _NOTHING:
            fast = _field_vs_constant(node.args[0], left, op, rc)
            if fast is not None:
                return fast, _NOTHING
            return (lambda c: test(left(c), rc)), _NOTHING
        return (lambda c: test(left(c), right(c))), _NOTHING

    def _and(self, node: Node) -> tuple[Fn, Any]:
        return self._logic(node, is_and=True)

    def _or(self, node: Node) -> tuple[Fn, Any]:
        return self._logic(node, is_and=False)

    def _logic(self, node: Node, *, is_and: bool) -> tuple[Fn, Any]:
        parts = [self.compile(child) for child in node.args]
        live = []
        for fn, const in parts:
            if const is _NOTHING:
                live.append(fn)
            elif (not const) if is_and else bool(const):
                return _constant(None), const  # short-circuits whatever follows
        if not live:
            return _constant(None), parts[-1][1]
        if len(live) == 1:
            return live[0], _NOTHING
        if len(live) == 2:
            a, b = live
            return ((lambda c: a(c) and b(c)) if is_and else (lambda c: a(c) or b(c))), _NOTHING
        if len(live) == 3:
            a, b, d = live
            if is_and:
                return (lambda c: a(c) and b(c) and d(c)), _NOTHING
            return (lambda c: a(c) or b(c) or d(c)), _NOTHING
        fns = tuple(live)
        if is_and:

            def all_of(c: Any) -> Any:
                value = True
                for f in fns:
                    value = f(c)
                    if not value:
                        return value
                return value

            return all_of, _NOTHING

        def any_of(c: Any) -> Any:
            value = False
            for f in fns:
                value = f(c)
                if value:
                    return value
            return value

        return any_of, _NOTHING

    # -- calls -----------------------------------------------------------------------
    def _call(self, node: Node) -> tuple[Fn, Any]:
        name = node.value
        spec = FUNCTIONS.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(FUNCTIONS), n=1)
            hint = (
                f"; did you mean {close[0]}()?"
                if close
                else f" (known: {', '.join(sorted(FUNCTIONS))})"
            )
            raise self.fail(node, f"unknown function {name}(){hint}")
        self.refs.calls.add(name)
        args = [self._arg(child) for child in node.args]
        kwargs = {key: self._arg(child) for key, child in node.kwargs.items()}
        most = len(spec.positional) if spec.max_positional is None else spec.max_positional
        if not spec.variadic and len(args) > most:
            raise self.fail(
                node, f"{name}() takes at most {most} positional argument(s), got {len(args)}"
            )
        if spec.variadic and kwargs:
            raise self.fail(node, f"{name}() takes no named arguments")
        for key in kwargs:
            if key not in spec.positional:
                raise ExprError(
                    f"{name}() has no argument '{key}' "
                    f"(it takes {', '.join(spec.positional) or 'none'})",
                    node.kw_at.get(key, node.start),
                )
        bound = dict(zip(spec.positional, args, strict=False)) if not spec.variadic else {}
        for key, value in kwargs.items():
            if key in bound:
                raise self.fail(node, f"{name}() got '{key}' twice")
            bound[key] = value
        given = len(args) if spec.variadic else len(bound)
        if given < spec.required or (
            not spec.variadic and any(p not in bound for p in spec.positional[: spec.required])
        ):
            raise self.fail(
                node,
                f"{name}() needs {spec.required} argument(s): "
                f"{', '.join(spec.positional[: spec.required])}",
            )
        if name in ("count", "last") and args and args[0].is_const:
            names = args[0].const
            self.refs.events.update(
                [names]
                if isinstance(names, str)
                else [n for n in names if isinstance(n, str)]
                if isinstance(names, list)
                else []
            )
            if name == "last" and isinstance(names, str) and not node.in_attr:
                self.refs.last[names] = None
        if (
            name == "segment"
            and args
            and args[0].is_const
            and args[0].const not in self.scope.segments
        ):
            known = ", ".join(sorted(self.scope.segments)) or "none are defined"
            raise self.fail(node.args[0], f"unknown segment {args[0].const!r} ({known})")
        if name == "local_hour":
            self.refs.names.add("timezone")
        try:
            fn = spec.build(*args) if spec.variadic else spec.build(**bound)
        except ArgError as exc:
            raise self.fail(node, str(exc)) from None
        return fn, _NOTHING

    def _arg(self, node: Node) -> Arg:
        fn, const = self.compile(node)
        return Arg(fn) if const is _NOTHING else Arg(fn, const)


def _field_vs_constant(target: Node, left: Fn, op: str, rc: Any) -> Fn | None:
    """Fast closures for `field OP constant`, the commonest shape, reading the field inline.

    Same results as the generic comparison (ids match as numbers or strings,
    ordering is false for null or mismatched types), one call level less.
    """
    access = _access(target)
    if op == "==" and isinstance(rc, str):
        if access is None:
            return lambda c: (v := left(c)) == rc or (v.__class__ is int and str(v) == rc)
        kind, arg = access
        if kind == "event":
            return lambda c: (v := c.ev.get(arg)) == rc or (v.__class__ is int and str(v) == rc)
        return lambda c: (v := arg(c.p)) == rc or (v.__class__ is int and str(v) == rc)
    if op in ("<", "<=", ">", ">=") and isinstance(rc, (int, float)) and not isinstance(rc, bool):
        raw = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}[op]
        test = _COMPARE[op]
        if access is None:
            get = left
        elif access[0] == "event":
            prop = access[1]

            def ordered_event(c: Any) -> bool:
                v = c.ev.get(prop)
                cls = v.__class__
                return raw(v, rc) if cls is int or cls is float else test(v, rc)

            return ordered_event
        else:
            field_of = access[1]

            def ordered_profile(c: Any) -> bool:
                v = field_of(c.p)
                cls = v.__class__
                return raw(v, rc) if cls is int or cls is float else test(v, rc)

            return ordered_profile

        def ordered(c: Any) -> bool:
            v = get(c)
            cls = v.__class__
            return raw(v, rc) if cls is int or cls is float else test(v, rc)

        return ordered
    if (
        op in ("in", "not in")
        and isinstance(rc, list)
        and rc
        and all(isinstance(v, str) for v in rc)
    ):
        members = frozenset(rc)
        negate = op == "not in"
        if access is not None and access[0] == "event":
            prop = access[1]

            def member_event(c: Any) -> bool:
                v = c.ev.get(prop)
                found = v is not None and (v if v.__class__ is str else str(v)) in members
                return found != negate

            return member_event

        def member(c: Any) -> bool:
            v = left(c)
            found = v is not None and (v if v.__class__ is str else str(v)) in members
            return found != negate

        return member
    return None


def _access(node: Node) -> tuple[str, Any] | None:
    """("event", property) or ("profile", getter) when `node` reads one directly."""
    if node.kind == "attr" and node.args[0].kind == "name":
        if node.args[0].value == "event":
            return "event", node.value
        if node.args[0].value == "profile" and node.value in PROFILE_FIELDS:
            return "profile", operator.attrgetter(node.value)
    if node.kind == "name" and node.value in PROFILE_FIELDS:
        return "profile", operator.attrgetter(node.value)
    return None


def _profile_field(name: str) -> Fn:
    getter = operator.attrgetter(name)
    return lambda c: getter(c.p)

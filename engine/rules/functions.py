"""The functions a condition may call, each compiled into a closure over its arguments.

A builder gets the compiled argument closures and returns one closure
`fn(ctx) -> value`. Arguments the language requires to be constant (event
names, segment names, durations) are checked when the rule is loaded.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.rules import index
from engine.rules.durations import parse_duration

Fn = Callable[[Any], Any]
_NO = object()


class ArgError(ValueError):
    """A call with the wrong arguments; `arg` names the one at fault (or None)."""

    def __init__(self, message: str, arg: str | int | None = None):
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class Arg:
    """A compiled argument: its closure, and its value when it is a constant."""

    fn: Fn
    const: Any = _NO

    @property
    def is_const(self) -> bool:
        return self.const is not _NO


@dataclass(frozen=True)
class Function:
    """A callable name: arity, named arguments and a builder."""

    name: str
    positional: tuple[str, ...]  # parameter names, in order
    required: int
    build: Callable[..., Fn]
    variadic: bool = False
    doc: str = ""
    max_positional: int | None = None  # None: all of `positional`


def _event_names(arg: Arg, what: str) -> tuple[str, ...]:
    value = arg.const
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ArgError(f"{what} must be an event name in quotes, or a list of them")


def _duration(arg: Arg | None, what: str) -> float | Fn | None:
    """A constant duration in seconds, or a closure for a computed one."""
    if arg is None:
        return None
    if not arg.is_const:
        fn = arg.fn

        def computed(c: Any) -> float | None:
            # a value from the data: a number of seconds or a duration like "7d", else none
            value = fn(c)
            if isinstance(value, bool) or value is None:
                return None
            try:
                seconds = parse_duration(value)
            except (ValueError, TypeError):
                return None
            return seconds if math.isfinite(seconds) else None

        return computed
    value = arg.const
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ArgError(f"{what}: {exc}") from None


def _stamp(value: Any) -> float | None:
    """Epoch seconds from a number or from an event-like dict with `ts`."""
    if isinstance(value, dict):
        value = value.get("ts")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _ident(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


# -- window functions over the profile's recent events --------------------------
def _build_count(
    names: Arg,
    within: Arg | None = None,
    *,
    since: Arg | None = None,
    product: Arg | None = None,
    category: Arg | None = None,
) -> Fn:
    wanted = _event_names(names, "count()'s first argument")
    window = _duration(within, "count()'s window")
    since_fn = since.fn if since is not None else None
    product_fn = product.fn if product is not None else None
    category_fn = category.fn if category is not None else None
    single = wanted[0] if len(wanted) == 1 else None
    name_set = frozenset(wanted)

    if window is None and since_fn is None and product_fn is None and category_fn is None:
        # all-time counts live on the profile already
        if single is not None:
            return lambda c: c.p.counts.get(single, 0)
        return lambda c: sum(c.p.counts.get(n, 0) for n in wanted)

    def count(c: Any) -> int:
        now = c.now
        lo = -math.inf
        if window is not None:
            lo = now - (window if window.__class__ is float else (window(c) or 0))
        if since_fn is not None:
            start = _stamp(since_fn(c))
            if start is None:
                return 0
            lo = max(lo, start - 1e-9)  # events at the start instant count
        pid = None
        if product_fn is not None:
            value = product_fn(c)
            pid = value if value.__class__ is str else _ident(value)
            if pid is None:
                return 0
        cat = category_fn(c) if category_fn is not None else None
        if cat is not None and cat.__class__ is not str:
            return 0  # a category that is not text (a client's list) matches nothing
        if pid is not None:
            if cat is None:
                return _indexed(c, wanted, index.PRODUCT, pid, lo, now)
        elif cat.__class__ is str:
            return _indexed(c, wanted, index.CATEGORY, cat, lo, now)
        # rules on one event often ask the same question, or the same kind: answer once
        memo = c.memo
        if memo is None:
            memo = c.memo = {}
        key = (wanted, lo, pid, cat)
        found = memo.get(key)
        if found is None:
            memo[key] = found = _count_window(
                c.p.recent, now, lo, wanted, single, name_set, pid, cat, memo
            )
        return found

    if single is not None and since_fn is None and not callable(window):
        # the common shapes, straight to the index: count("X", 7d, product=...)
        span = math.inf if window is None else window
        if product_fn is not None and category_fn is None:
            by_product = index.index_key(single, index.PRODUCT)

            def count_product(c: Any) -> int:
                value = product_fn(c)
                pid = value if value.__class__ is str else _ident(value)
                if pid is None:
                    return 0
                now = c.now
                return index.count(
                    c.p, c.j, by_product, single, index.PRODUCT, pid, now - span, now
                )

            return count_product
        if category_fn is not None and product_fn is None:
            by_category = index.index_key(single, index.CATEGORY)

            def count_category(c: Any) -> int:
                cat = category_fn(c)
                if cat.__class__ is not str:
                    return count(c)  # null: any category; not text: matches nothing
                now = c.now
                return index.count(
                    c.p, c.j, by_category, single, index.CATEGORY, cat, now - span, now
                )

            return count_category
    return count


def _indexed(c: Any, wanted: tuple[str, ...], at: int, want: str, lo: float, now: float) -> int:
    """The count from the journey's index of `recent` (engine.rules.index)."""
    return sum(
        index.count(c.p, c.j, index.index_key(name, at), name, at, want, lo, now) for name in wanted
    )


_TS = operator.itemgetter(0)
_NAME_OF = operator.itemgetter(1)


def _count_window(
    recent: list,
    now: float,
    lo: float,
    wanted: tuple[str, ...],
    single: str | None,
    names: frozenset[str],
    pid: str | None,
    cat: Any,
    memo: dict,
) -> int:
    """Count matching entries in (lo, now]; from the second count of a kind, via a Counter.

    The first count of a (window, field) scans directly, which is cheapest for
    one question. A second one builds, once per event, a Counter of the
    window's (name, field) pairs that answers it and every later one.
    """
    if pid is not None and cat is not None:
        return _scan(recent, now, lo, single, names, pid, cat)
    at = 2 if pid is not None else 3 if cat is not None else 1
    want = pid if pid is not None else cat
    projection_key = ("projection", lo, at)
    projection = memo.get(projection_key)
    if projection is None:
        if projection_key not in memo:
            memo[projection_key] = None  # seen once: scan; build it if asked again
            return _scan(recent, now, lo, single, names, pid, cat)
        start = bisect.bisect_right(recent, lo, key=_TS)
        stop = bisect.bisect_right(recent, now, key=_TS)
        window = recent[start:stop]
        names_of = map(_NAME_OF, window)
        # built in C: every later count of this kind is a dict lookup
        projection = Counter(
            names_of
            if at == 1
            else zip(names_of, map(operator.itemgetter(at), window), strict=True)
        )
        memo[projection_key] = projection
    if at == 1:
        return sum(projection[name] for name in wanted)
    return sum(projection[(name, want)] for name in wanted)


def _scan(
    recent: list,
    now: float,
    lo: float,
    single: str | None,
    names: frozenset[str],
    pid: str | None,
    cat: Any,
) -> int:
    """Entries of `recent` in (lo, now] matching name(s), product and category."""
    n = 0
    # test the most selective field first, and the window only on a hit (recent is time-ordered)
    if pid is not None or cat is not None:
        at, want = (2, pid) if pid is not None else (3, cat)
        for entry in reversed(recent):
            if entry[at] == want:
                ts = entry[0]
                if ts <= lo:
                    break
                if (
                    ts <= now
                    and (entry[1] == single if single is not None else entry[1] in names)
                    and (cat is None or entry[3] == cat)
                ):
                    n += 1
        return n
    for ts, name, _, _ in reversed(recent):
        if ts <= lo:
            break
        if ts <= now and (name == single if single is not None else name in names):
            n += 1
    return n


def _build_last(name: Arg) -> Fn:
    wanted = _event_names(name, "last()'s argument")
    if len(wanted) != 1:
        raise ArgError("last() takes one event name")
    event_name = wanted[0]

    def last(c: Any) -> dict | None:
        stored = (c.j.get("last") or {}).get(event_name)
        if stored is not None and stored.get("ts", 0) <= c.now:
            return stored
        for entry in reversed(c.p.recent):  # untracked: what the profile itself keeps
            if entry[1] == event_name and entry[0] <= c.now:
                return {"ts": entry[0], "product_id": entry[2], "category": entry[3]}
        return stored

    return last


_TIME, _PRODUCT = operator.itemgetter(0), operator.itemgetter(1)


def _build_purchased(product: Arg, within: Arg | None = None) -> Fn:
    window = _duration(within, "purchased()'s window")
    product_fn = product.fn

    def purchased(c: Any) -> bool:
        wanted = product_fn(c)
        if wanted is None:
            return False
        ids = {_ident(w) for w in wanted} if isinstance(wanted, list) else {_ident(wanted)}
        now = c.now
        bought = c.p.purchased  # time-ordered (Profile keeps it sorted)
        end = bisect.bisect_right(bought, now, key=_TIME)
        start = 0
        if window is not None:
            lo = now - (window if window.__class__ is float else (window(c) or 0))
            start = bisect.bisect_right(bought, lo, 0, end, key=_TIME)
        # in C, not a generator: asked on every product view, over up to 50 purchases
        return not ids.isdisjoint(map(_PRODUCT, bought[start:end]))

    return purchased


def _build_session_dwell(
    *,
    category: Arg | None = None,
    product: Arg | None = None,
    event: Arg | None = None,
    gap: Arg | None = None,
) -> Fn:
    gap_s = _duration(gap, "session_dwell()'s gap")
    if gap_s is None:
        gap_s = 1800.0
    if not isinstance(gap_s, float):
        raise ArgError("session_dwell()'s gap must be a constant duration", "gap")
    names = _event_names(event, "session_dwell()'s event") if event is not None else None
    category_fn = category.fn if category is not None else None
    product_fn = product.fn if product is not None else None

    def dwell(c: Any) -> float:
        """Seconds between each matching event and the next one, within the current session."""
        now = c.now
        cat = category_fn(c) if category_fn is not None else None
        pid = _ident(product_fn(c)) if product_fn is not None else None
        total = 0.0
        later = None
        for entry in reversed(c.p.recent):
            ts = entry[0]
            if ts > now:
                continue
            if later is not None:
                step = later - ts
                if step >= gap_s:
                    break  # the session began after this event
                if (
                    (cat is None or entry[3] == cat)
                    and (pid is None or entry[2] == pid)
                    and (names is None or entry[1] in names)
                ):
                    total += step
            later = ts
        return total

    return dwell


# -- small helpers ----------------------------------------------------------------
def _since(scale: float) -> Callable[[Arg], Fn]:
    def build(time: Arg) -> Fn:
        fn = time.fn

        def since(c: Any) -> float | None:
            stamp = _stamp(fn(c))
            return None if stamp is None else (c.now - stamp) / scale

        return since

    return build


def _build_product_ids(event: Arg) -> Fn:
    fn = event.fn

    def product_ids(c: Any) -> list[str]:
        value = fn(c)
        if not isinstance(value, dict):
            return []
        out = []
        lines = value.get("products")
        for line in lines if isinstance(lines, list) else ():  # a client's 5 or true: none
            if isinstance(line, dict):
                pid = _ident(line.get("product_id", line.get("sku")))
                if pid is not None and pid not in out:
                    out.append(pid)
        own = _ident(value.get("product_id", value.get("sku")))
        if own is not None and own not in out:
            out.append(own)
        return out

    return product_ids


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            return 0.0
    return float(value)


def _build_cart_total() -> Fn:
    def cart_total(c: Any) -> float:
        total = sum(
            _number(i.get("price")) * _number(i.get("quantity", 1)) for i in c.p.cart.values()
        )
        return round(total, 2)

    return cart_total


def _build_len(value: Arg) -> Fn:
    fn = value.fn

    def length(c: Any) -> int | None:
        v = fn(c)
        if v is None:
            return 0
        return len(v) if isinstance(v, (str, list, dict)) else None

    return length


def _build_lower(text: Arg) -> Fn:
    fn = text.fn
    return lambda c: v.lower() if isinstance(v := fn(c), str) else None


def _build_abs(number: Arg) -> Fn:
    fn = number.fn
    return lambda c: (
        abs(v) if isinstance(v := fn(c), (int, float)) and not isinstance(v, bool) else None
    )


def _build_round(number: Arg, digits: Arg | None = None) -> Fn:
    fn = number.fn
    places = digits.const if digits is not None else 0
    if not isinstance(places, int) or isinstance(places, bool):
        raise ArgError("round()'s digits must be a whole number", 1)

    def rounded(c: Any) -> float | None:
        v = fn(c)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None  # round() of an infinity or NaN raises
        return round(v, places) if places else round(v)

    return rounded


def _extreme(pick: Callable) -> Callable[..., Fn]:
    def build(*values: Arg) -> Fn:
        fns = [v.fn for v in values]

        def extreme(c: Any) -> Any:
            seen = [v for f in fns if (v := f(c)) is not None and not isinstance(v, bool)]
            try:
                return pick(seen) if seen else None
            except TypeError:
                return None

        return extreme

    return build


def _build_coalesce(*values: Arg) -> Fn:
    fns = [v.fn for v in values]

    def coalesce(c: Any) -> Any:
        for f in fns:
            v = f(c)
            if v is not None:
                return v
        return None

    return coalesce


def _build_segment(name: Arg) -> Fn:
    if not isinstance(name.const, str):
        raise ArgError("segment()'s argument must be a segment name in quotes")
    wanted = name.const
    return lambda c: wanted in (c.j.get("seg") or ())


def _build_score(model: Arg) -> Fn:
    if not isinstance(model.const, str) or not model.const:
        raise ArgError("score()'s argument must be a model name in quotes")
    wanted = model.const

    def score(c: Any) -> float | None:
        scores = c.p.scores
        found = scores.get(wanted) if scores else None
        return found.get("p") if found else None

    return score


def _build_local_hour() -> Fn:
    def local_hour(c: Any) -> int:
        return c.rs.local_time(c.p, c.now).hour

    return local_hour


FUNCTIONS: dict[str, Function] = {
    f.name: f
    for f in (
        Function(
            "count",
            ("names", "within", "since", "product", "category"),
            1,
            _build_count,
            doc="events named NAMES (one or a list) in the window, of a product/category",
            max_positional=2,
        ),
        Function(
            "last",
            ("name",),
            1,
            _build_last,
            doc="the latest event named NAME: its properties and ts",
        ),
        Function(
            "purchased",
            ("product", "within"),
            1,
            _build_purchased,
            doc="true if the product (or any of a list) was ordered in the window",
        ),
        Function(
            "session_dwell",
            ("category", "product", "event", "gap"),
            0,
            _build_session_dwell,
            doc="seconds spent on matching events in the current session",
            max_positional=0,
        ),
        Function("since", ("time",), 1, _since(1.0), doc="seconds since a time or an event"),
        Function(
            "minutes_since", ("time",), 1, _since(60.0), doc="minutes since a time or an event"
        ),
        Function("hours_since", ("time",), 1, _since(3600.0), doc="hours since a time or an event"),
        Function("days_since", ("time",), 1, _since(86400.0), doc="days since a time or an event"),
        Function(
            "product_ids",
            ("event",),
            1,
            _build_product_ids,
            doc="product ids of an event: its products list and product_id",
        ),
        Function(
            "cart_total", (), 0, _build_cart_total, doc="sum of price x quantity over the cart"
        ),
        Function(
            "len", ("value",), 1, _build_len, doc="length of a string, list or table (0 for null)"
        ),
        Function("lower", ("text",), 1, _build_lower, doc="lower-cased text"),
        Function("abs", ("number",), 1, _build_abs, doc="absolute value"),
        Function("round", ("number", "digits"), 1, _build_round, doc="rounded number"),
        Function(
            "min", ("values",), 1, _extreme(min), variadic=True, doc="smallest non-null argument"
        ),
        Function(
            "max", ("values",), 1, _extreme(max), variadic=True, doc="largest non-null argument"
        ),
        Function(
            "coalesce",
            ("values",),
            1,
            _build_coalesce,
            variadic=True,
            doc="first non-null argument",
        ),
        Function(
            "segment", ("name",), 1, _build_segment, doc="true if the customer is in the segment"
        ),
        Function(
            "local_hour", (), 0, _build_local_hour, doc="hour of day in the customer's time zone"
        ),
        Function(
            "score",
            ("model",),
            1,
            _build_score,
            doc="the customer's probability from a trained model (null until scored)",
        ),
    )
}

# functions whose first argument names events (for lint)
EVENT_NAME_ARGS = {"count": "names", "last": "name"}

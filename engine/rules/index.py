"""Where each product (or category) shows up in `profile.recent`, so count() need not rescan it.

A rule such as browse abandonment asks, on every product view,
`count("Product Viewed", 7d, product=event.product_id)`. Answered by walking
`recent`, that touches up to 50 scattered entries per event. Instead count()
keeps, for each event name it is asked about by product or category, the
times of that name's events by value, in the journey::

    "ix": {"product:Product Viewed": [n, t, newest, {"p1": [ts, ...], ...}, last]}

The index is a cache of `recent`, brought up to date when asked, never a
second source of truth, and never checkpointed (Profile.to_dict leaves it out):

* `n` is `profile.counts[name]` when the index was last brought up to date.
  Every applied event bumps that count. When it moved by k, and exactly k
  entries called `name` follow the very entry indexed last (`last`, kept by
  identity) in `recent`, those are the new ones and are added (every event
  makes one entry, a merge brings at most its count of them); anything else
  (a late event placed earlier, `last` dropped from `recent`, a merge that
  brought older entries) rebuilds the index from `recent`. Ties are common
  (a batch sent without timestamps shares one receivedAt), so they must not
  force rebuilds: equal times are appended in order, after `last`.
* Each product's (or category's) times are in time order, as `recent` is, so
  a window is counted with two binary searches.
* `recent` keeps a time-ordered suffix of the events: every indexed time after
  `recent[0]`'s is in it, every earlier one has been dropped. A time equal to
  `recent[0]`'s is ambiguous (a twin may have been dropped), so those are
  counted in `recent` itself.
* `t` bounds the times held (older ones pushed out of `recent` linger); past
  `len(recent) + _SLACK` the index is rebuilt from `recent`.

So a count from the index equals a scan of `recent`, whatever happened.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

PRODUCT, CATEGORY = 2, 3  # count()'s fields: their position in a `recent` entry
_SLACK = 16


def count(
    profile: Any,
    journey: dict,
    key: str,
    name: str,
    at: int,
    want: str,
    lo: float,
    now: float,
) -> int:
    """Entries of `recent` in (lo, now] called `name` whose field `at` is `want`.

    `key` names the index: `index_key(name, at)`.
    """
    recent = profile.recent
    if not recent:
        return 0
    ix = journey.get("ix")
    entry = ix.get(key) if ix is not None else None
    seen = profile.counts.get(name, 0)
    if entry is None or (entry[0] != seen and not _catch_up(entry, recent, name, at, seen)):
        if ix is None:
            ix = journey["ix"] = {}
        ix[key] = entry = build(recent, name, at, seen)
    times = entry[3].get(want)
    if not times:
        return 0
    # `times` is in time order: those in (lo, now] and after the edge, by binary search
    edge = recent[0][0]
    total = bisect_right(times, now) - bisect_right(times, lo if lo > edge else edge)
    if total < 0:
        total = 0
    if lo < edge <= now:
        at_edge = bisect_left(times, edge)
        if at_edge < len(times) and times[at_edge] == edge:
            total += _at_edge(recent, name, at, want)
    return total


def _catch_up(entry: list, recent: list, name: str, at: int, seen: int) -> bool:
    """Add the events of `name` that follow the last one indexed; False if a rebuild is needed.

    The `seen - n` events counted since the index was brought up to date must all
    come after `last` in `recent` (they are then the only new ones); a late event
    placed before it, an entry dropped from `recent`, or a merge that brought
    older entries breaks that and asks for a rebuild.
    """
    missing = seen - entry[0]
    last = entry[4]
    if missing <= 0 or last is None or entry[1] + missing > len(recent) + _SLACK:
        return False
    found = []
    for item in reversed(recent):
        if item is last:
            break
        if item[1] == name:
            found.append(item)
            if len(found) > missing:
                return False
    else:
        return False  # `last` left `recent`
    if len(found) != missing:
        return False
    table = entry[3]
    for item in reversed(found):  # oldest first, so each `times` stays in time order
        value = item[at]
        if value is not None:
            times = table.get(value)
            if times is None:
                table[value] = [item[0]]
            else:
                times.append(item[0])
    entry[0] = seen
    entry[1] += missing
    entry[2] = found[0][0]
    entry[4] = found[0]
    return True


def index_key(name: str, at: int) -> str:
    """The journey key of the index of `name` by field `at`: "product:Product Viewed"."""
    return f"{'product' if at == PRODUCT else 'category'}:{name}"


def _at_edge(recent: list, name: str, at: int, want: str) -> int:
    """Matching entries of `recent` at its oldest time (twins of theirs may be gone)."""
    edge = recent[0][0]
    n = 0
    for item in recent:
        if item[0] != edge:
            break
        if item[1] == name and item[at] == want:
            n += 1
    return n


def build(recent: list, name: str, at: int, seen: int) -> list:
    """The index of `name` by field `at` from `recent` itself (`seen`: the count of `name`)."""
    table: dict[str, list[float]] = {}
    held = 0
    newest = None
    last = None
    for item in recent:
        if item[1] == name:
            held += 1
            ts = item[0]
            if newest is None or ts >= newest:
                newest = ts
                last = item
            value = item[at]
            if value is not None:
                times = table.get(value)
                if times is None:
                    table[value] = [ts]
                else:
                    times.append(ts)
    return [seen, held, newest, table, last]

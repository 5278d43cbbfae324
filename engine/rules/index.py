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
  Every applied event bumps that count. One event more, found last in
  `recent`, not older than `newest` (the newest time indexed) and not the
  very entry indexed last (`last`, kept by identity), is added; anything else
  (a late event, a profile merge) rebuilds the index from `recent`. Ties are
  common (a batch sent without timestamps shares one receivedAt), so they
  must not force rebuilds: equal times are appended in order, which is why
  the entry after `last` at an equal time can only be the new one.
* `recent` keeps a time-ordered suffix of the events: every indexed time after
  `recent[0]`'s is in it, every earlier one has been dropped. A time equal to
  `recent[0]`'s is ambiguous (a twin may have been dropped), so those are
  counted in `recent` itself.
* `t` bounds the times held (older ones pushed out of `recent` linger); past
  `len(recent) + _SLACK` the index is rebuilt from `recent`.

So a count from the index equals a scan of `recent`, whatever happened.
"""

from __future__ import annotations

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
    if entry is None or entry[0] != seen:
        last = recent[-1]
        if (
            entry is not None
            and entry[0] == seen - 1
            and last[1] == name
            and last is not entry[4]
            and ((newest := entry[2]) is None or last[0] >= newest)
            and entry[1] < len(recent) + _SLACK
        ):
            # exactly one event more, and it is this one (nothing indexed comes after it)
            ts = entry[2] = last[0]
            entry[4] = last
            entry[0] = seen
            entry[1] += 1
            value = last[at]
            if value is not None:
                times = entry[3].get(value)
                if times is None:
                    entry[3][value] = [ts]
                else:
                    times.append(ts)
        else:
            if ix is None:
                ix = journey["ix"] = {}
            ix[key] = entry = build(recent, name, at, seen)
    times = entry[3].get(want)
    if not times:
        return 0
    edge = recent[0][0]
    total = 0
    tie = False
    for ts in times:
        if lo < ts <= now:
            if ts > edge:
                total += 1
            elif ts == edge:
                tie = True
    if tie:
        total += _at_edge(recent, name, at, want)
    return total


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

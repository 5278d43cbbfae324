"""Item-to-item co-occurrence counts, kept live and merged across shards (pure).

Each shard holds a `CoCounts` of what its own customers did since its last
flush: when a customer views, adds or buys product p, p is paired with the
last few distinct products of that customer's recent history (and with the
other lines of the same order, the first BASKET_ITEMS). A pair weighs the
smaller of its two event weights (view 1, add 3, purchase 5 by default),
halved for every `pair_half_life_s` between the two events. Every contribution is also scaled
by 2^((t - EPOCH) / half_life_s) ("forward decay"): newer behaviour counts
more, and no stored number ever has to be rewritten as time passes.

Similarity is cosine-like: co(a, b) / sqrt(mass(a) * mass(b)), where mass is
the item's own decayed event weight, so very popular items do not dominate
every list. Deltas are plain sums, so the merge of shards (in Redis, or
`merge` here) is addition.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

EPOCH = 1_600_000_000.0  # 2020-09-13: forward decay is relative to it
# Scales must stay finite (with room for sums) until the API's last accepted year.
HORIZON = 4_102_444_800.0  # 2100-01-01
MAX_EXPONENT = 960.0


def min_half_life_s() -> float:
    """The shortest forward-decay half-life whose scale stays finite until HORIZON."""
    return (HORIZON - EPOCH) / MAX_EXPONENT


VIEW, ADD, PURCHASE = "Product Viewed", "Product Added", "Order Completed"
# Lines of one order paired with each other, at most (the first ones). Pairs grow
# with the square of the lines: an order of 1,400 lines (one 30 KB event) made a
# million pairs and a 260 ms stall, and crowded real pairs out of the next flushes.
BASKET_ITEMS = 30


@dataclass(frozen=True, slots=True)
class CoSettings:
    """How events turn into co-occurrence weight."""

    view_weight: float = 1.0
    add_weight: float = 3.0
    purchase_weight: float = 5.0
    half_life_s: float = 90 * 86400.0  # forward decay of every contribution
    pair_half_life_s: float = 60 * 86400.0  # decay over the gap between the two events
    history_items: int = 5  # distinct earlier products a new one is paired with
    history_window_s: float = 365 * 86400.0

    def weight(self, event: str) -> float:
        """The weight of one event name (0 for events that say nothing about products)."""
        if event == VIEW:
            return self.view_weight
        if event == ADD:
            return self.add_weight
        if event == PURCHASE:
            return self.purchase_weight
        return 0.0

    def scale(self, ts: float) -> float:
        """The forward-decay factor of a contribution made at `ts`."""
        return math.exp2((ts - EPOCH) / self.half_life_s)


class CoCounts:
    """Co-occurrence, item mass and popularity per category: sums, mergeable.

    A pair is the ordered pair (a, b) with a < b: one update per pair on the hot
    path; both directions are written out at flush time. It is held at
    `_rows[a][b]`: a small dict per item, keyed by the product ids themselves
    (shared strings, see engine.profile.share_strings), rather than one dict of
    all pairs keyed by tuples. With tens of thousands of pairs carried between
    flushes, each update then costs a lookup in a row that stays in the cache
    instead of a miss in one large table and a tuple built and compared
    (measured: about three times cheaper per pair). `pairs` gives them as one
    dict keyed by (a, b), for flushes and tests.
    """

    __slots__ = ("_adjacent", "_rows", "dropped", "events", "mass", "popular", "settings")

    def __init__(self, settings: CoSettings | None = None):
        self.settings = settings or CoSettings()
        self._rows: dict[str, dict[str, float]] = {}
        self.mass: dict[str, float] = {}
        self.popular: dict[str, dict[str, float]] = {}  # category ("" = all) -> {item: weight}
        self.events = 0
        self.dropped = 0  # pairs given up because more were carried over than allowed
        self._adjacent: dict[str, dict[str, float]] | None = None

    def __bool__(self) -> bool:
        return bool(self.mass)

    @property
    def pairs(self) -> dict[tuple[str, str], float]:
        """Every pair's weight by (a, b), a < b: a new dict, so build it once per use."""
        return {(a, b): w for a, row in self._rows.items() for b, w in row.items()}

    @pairs.setter
    def pairs(self, pairs: dict[tuple[str, str], float]) -> None:
        rows: dict[str, dict[str, float]] = {}
        for (a, b), w in pairs.items():
            row = rows.get(a)
            if row is None:
                row = rows[a] = {}
            row[b] = w
        self._rows = rows
        self._adjacent = None

    def pair_count(self) -> int:
        """How many pairs are held (without building `pairs`)."""
        return sum(map(len, self._rows.values()))

    def observe(
        self,
        items: list[str],
        weight: float,
        ts: float,
        history: Iterable[tuple[float, str, float]],
        categories: dict[str, str] | None = None,
    ) -> None:
        """Count event(s) on `items` at `ts`, paired with `history` (ts, item, weight).

        `items` are one event's products (a view: one; an order: its lines),
        which also pair with each other (the first BASKET_ITEMS of them).
        """
        if not items or weight <= 0:
            return
        s = self.settings
        scale = math.exp2((ts - EPOCH) / s.half_life_s)
        w = weight * scale
        mass, rows, popular = self.mass, self._rows, self.popular
        everyone = popular.get("")
        if everyone is None:
            everyone = popular[""] = {}
        self.events += 1
        self._adjacent = None
        pair_half = s.pair_half_life_s
        exp2 = math.exp2
        for i, item in enumerate(items):
            mass[item] = mass.get(item, 0.0) + w
            everyone[item] = everyone.get(item, 0.0) + w
            if categories:
                category = categories.get(item)
                if category:
                    table = popular.get(category)
                    if table is None:
                        table = popular[category] = {}
                    table[item] = table.get(item, 0.0) + w
            for other in items[:i] if i < BASKET_ITEMS else ():
                if other != item:
                    a, b = (item, other) if item < other else (other, item)
                    row = rows.get(a)
                    if row is None:
                        row = rows[a] = {}
                    row[b] = row.get(b, 0.0) + w
            for then, other, other_weight in history:
                if other == item:
                    continue
                pw = (weight if weight < other_weight else other_weight) * scale
                if ts > then:
                    pw *= exp2((then - ts) / pair_half)
                a, b = (item, other) if item < other else (other, item)
                row = rows.get(a)
                if row is None:
                    row = rows[a] = {}
                row[b] = row.get(b, 0.0) + pw

    def observe_one(
        self, profile: Any, item: str, weight: float, ts: float, category: Any = None
    ) -> None:
        """`observe` for one product event of `profile` (a view or an add), in one pass.

        The shard's hot path: pairs `item` with the customer's last distinct
        products exactly as `observe(..., history_of(profile, ts, ...))`
        would, without building the history list.
        """
        s = self.settings
        scale = math.exp2((ts - EPOCH) / s.half_life_s)
        w = weight * scale
        mass, rows, popular = self.mass, self._rows, self.popular
        mass[item] = mass.get(item, 0.0) + w
        everyone = popular.get("")
        if everyone is None:
            everyone = popular[""] = {}
        everyone[item] = everyone.get(item, 0.0) + w
        if category.__class__ is str and category:
            table = popular.get(category)
            if table is None:
                table = popular[category] = {}
            table[item] = table.get(item, 0.0) + w
        self.events += 1
        self._adjacent = None
        limit = s.history_items
        horizon = ts - s.history_window_s
        pair_half = s.pair_half_life_s
        view, add = s.view_weight, s.add_weight
        seen = {item}
        found = 0
        exp2 = math.exp2
        mine = None  # item's own row: where its pairs with greater items go
        for entry in reversed(profile.recent):
            then = entry[0]
            if then < horizon:
                break
            other = entry[2]
            if other is None or other in seen or then > ts:
                continue
            name = entry[1]
            if name == VIEW:
                ow = view
            elif name == ADD:
                ow = add
            else:
                continue
            seen.add(other)
            pw = (weight if weight < ow else ow) * scale
            if ts > then:
                pw *= exp2((then - ts) / pair_half)
            if item < other:
                if mine is None:
                    mine = rows.get(item)
                    if mine is None:
                        mine = rows[item] = {}
                mine[other] = mine.get(other, 0.0) + pw
            else:
                row = rows.get(other)
                if row is None:
                    row = rows[other] = {}
                row[item] = row.get(item, 0.0) + pw
            found += 1
            if found >= limit:
                return
        bought = s.purchase_weight
        for then, other in reversed(profile.purchased):
            if then < horizon:
                break
            if other in seen or then > ts:
                continue
            seen.add(other)
            pw = (weight if weight < bought else bought) * scale
            if ts > then:
                pw *= exp2((then - ts) / pair_half)
            if item < other:
                if mine is None:
                    mine = rows.get(item)
                    if mine is None:
                        mine = rows[item] = {}
                mine[other] = mine.get(other, 0.0) + pw
            else:
                row = rows.get(other)
                if row is None:
                    row = rows[other] = {}
                row[item] = row.get(item, 0.0) + pw
            found += 1
            if found >= limit:
                return

    def merge(self, other: CoCounts) -> None:
        """Add another shard's (or flush's) counts into these."""
        _drain(_add_rows(self._rows, other._rows))
        for item, w in other.mass.items():
            self.mass[item] = self.mass.get(item, 0.0) + w
        for category, table in other.popular.items():
            mine = self.popular.setdefault(category, {})
            for item, w in table.items():
                mine[item] = mine.get(item, 0.0) + w
        self.events += other.events
        self.dropped += other.dropped
        self._adjacent = None

    def take(self, max_pairs: int | None = None, carry: int | None = None) -> CoCounts:
        """Hand over what was counted so far (the shard's flush) and keep the rest.

        With `max_pairs`, only the heaviest `max_pairs` pairs go; the lighter ones
        stay here and keep adding up for a later flush, so Redis sees a bounded
        number of pair writes whatever the event rate. Of those carried, at most
        `carry` (the heaviest) are kept; `dropped` counts the rest. Item mass and
        popularity, one entry per product, always go whole. Among pairs of equal
        weight at the cut, the greater (a, b) goes first.
        """
        return _drain(self._take(max_pairs, carry, None))

    def take_steps(
        self, max_pairs: int | None = None, carry: int | None = None, *, step: int = 5000
    ) -> Generator[None, None, CoCounts]:
        """`take`, a piece of about `step` pairs' work at a time; returns the taken counts.

        For the shard's loop: with 200,000 pairs carried one take is 50-150 ms,
        a stall for every event waiting behind it. Everything held is set aside
        at the first step, so what is counted between pieces goes into fresh
        rows, and the pairs carried are added back to those at the end.
        """
        aside = CoCounts(self.settings)
        aside._rows, aside.mass, aside.popular, aside.events = (
            self._rows,
            self.mass,
            self.popular,
            self.events,
        )
        self._rows, self.mass, self.popular, self.events = {}, {}, {}, 0
        self._adjacent = None
        taken = yield from aside._take(max_pairs, carry, step)
        yield from _add_rows(self._rows, aside._rows, step=step, adopt=True)
        self.dropped += aside.dropped
        self._adjacent = None
        return taken

    def _take(
        self, max_pairs: int | None, carry: int | None, step: int | None
    ) -> Generator[None, None, CoCounts]:
        taken = CoCounts(self.settings)
        held = self.pair_count()
        if max_pairs is not None and held > max_pairs:
            heaviest = yield from self._extreme_steps(max_pairs, heaviest=True, step=step)
            taken.pairs = {(a, b): w for w, a, b in heaviest}
            rows = self._rows
            for _, a, b in heaviest:
                row = rows[a]
                del row[b]
                if not row:
                    del rows[a]
            held -= max_pairs
            if carry is not None and held > carry:
                yield from self._drop_lightest_steps(held - carry, step)
        else:
            taken._rows, self._rows = self._rows, {}
        taken.mass, taken.popular, taken.events = self.mass, self.popular, self.events
        self.mass, self.popular, self.events = {}, {}, 0
        self._adjacent = None
        return taken

    def _extreme_steps(
        self, n: int, *, heaviest: bool, step: int | None = None
    ) -> Generator[None, None, list[tuple[float, str, str]]]:
        """(weight, a, b) of the `n` heaviest pairs (heaviest first, ties by the greater
        pair), or of the `n` lightest (in no order, ties by the lesser pair).

        As heapq.nlargest (nsmallest) over every (weight, a, b), in cheaper passes:
        the n-th weight from the bare floats, then the pairs at or beyond it.
        With `step`, yields after about every `step` pairs looked at.
        """
        rows = self._rows
        values = yield from _weights(rows, step)
        cut = yield from _nth_steps(values, n, largest=heaviest, step=step)
        if cut is None:
            return []
        beyond: list[tuple[float, str, str]] = []
        at_cut: list[tuple[float, str, str]] = []
        done = 0
        for a, row in rows.items():
            if step is not None:
                done += len(row)
                if done >= step:
                    done = 0
                    yield
            # Most rows hold nothing that far out, which max/min tell in C.
            if heaviest:
                if max(row.values()) < cut:
                    continue
                for b, w in row.items():
                    if w >= cut:
                        (beyond if w > cut else at_cut).append((w, a, b))
            else:
                if min(row.values()) > cut:
                    continue
                for b, w in row.items():
                    if w <= cut:
                        (beyond if w < cut else at_cut).append((w, a, b))
        at_cut.sort(reverse=heaviest)
        beyond.extend(at_cut[: n - len(beyond)])
        if heaviest:  # the lightest are only deleted: their order does not matter
            beyond.sort(reverse=True)
        return beyond

    def _drop_lightest_steps(self, n: int, step: int | None = None) -> Generator[None, None, None]:
        """Drop the `n` lightest pairs, ties by the lesser (a, b): all but the heaviest stay.

        Keeping the heaviest `carry` by rebuilding every row took about a second
        per flush at 200,000 pairs; the few lightest are found and deleted in
        place instead. With `step`, yields after about every `step` pairs.
        """
        lightest = yield from self._extreme_steps(n, heaviest=False, step=step)
        rows = self._rows
        for i, (_, a, b) in enumerate(lightest, 1):
            row = rows[a]
            del row[b]
            if not row:
                del rows[a]
            if step is not None and i % step == 0:
                yield
        self.dropped += len(lightest)
        self._adjacent = None

    # -- reading (in memory: evaluation, tests; and the flush, both directions) ----------
    def adjacency(self) -> dict[str, dict[str, float]]:
        """item -> {neighbour: weight}, both directions (built once per change)."""
        if self._adjacent is None:
            adjacent: dict[str, dict[str, float]] = {}
            for a, row in self._rows.items():
                for b, w in row.items():
                    adjacent.setdefault(a, {})[b] = w
                    adjacent.setdefault(b, {})[a] = w
            self._adjacent = adjacent
        return self._adjacent

    def neighbors(self, item: str, n: int) -> list[tuple[str, float]]:
        """The `n` items co-occurring most with `item`, raw weights, best first."""
        row = self.adjacency().get(item)
        if not row:
            return []
        return sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def top_popular(self, category: str, n: int) -> list[tuple[str, float]]:
        """The `n` most popular items of `category` ("" for all)."""
        table = self.popular.get(category) or {}
        return sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _nth_steps(
    values: list[float], n: int, *, largest: bool, step: int | None = None
) -> Generator[None, None, float | None]:
    """The `n`-th greatest (or least) of `values`; with `step`, yields every `step` values.

    A flush picks a few thousand of up to 200,000 carried weights. A strided
    sample gives a bound that all but the extreme few times n lie beyond; only
    those are ranked exactly (heapq.nlargest's Python loop over all of them
    was most of a flush's CPU). A bound that leaves fewer than n falls back to
    ranking everything.
    """
    if len(values) <= n:
        return (min if largest else max)(values, default=None)
    stride = max(len(values) // 4096, 1)
    sample = sorted(values[::stride], reverse=largest)
    bound = sample[min(2 * (n // stride) + 1, len(sample) - 1)]
    near: list[float] = []
    chunk = step or len(values)
    for start in range(0, len(values), chunk):
        part = values[start : start + chunk]
        near.extend([w for w in part if w >= bound] if largest else [w for w in part if w <= bound])
        if step is not None:
            yield
    if len(near) < n:
        near = values
    return heapq.nlargest(n, near)[-1] if largest else sorted(near)[n - 1]


def _weights(rows: dict[str, dict[str, float]], step: int | None) -> Generator[None, None, list]:
    """Every pair's weight; with `step`, yields after about every `step` of them."""
    if step is None:
        return list(chain.from_iterable(map(dict.values, rows.values())))
    values: list[float] = []
    done = 0
    for row in rows.values():
        values.extend(row.values())
        done += len(row)
        if done >= step:
            done = 0
            yield
    return values


def _add_rows(
    rows: dict[str, dict[str, float]],
    theirs: dict[str, dict[str, float]],
    *,
    step: int | None = None,
    adopt: bool = False,
) -> Generator[None, None, None]:
    """Add the pairs of `theirs` into `rows`; `adopt` takes over their row dicts rather
    than copying them (`theirs` is discarded). With `step`, yields every `step` pairs."""
    done = 0
    for a, row_in in theirs.items():
        row = rows.get(a)
        if row is None:
            rows[a] = row_in if adopt else dict(row_in)
        else:
            for b, w in row_in.items():
                row[b] = row.get(b, 0.0) + w
        if step is not None:
            done += len(row_in)
            if done >= step:
                done = 0
                yield


def _drain(steps: Generator[None, None, Any]) -> Any:
    """Run a stepwise computation to its end; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def history_of(
    profile: Any, ts: float, settings: CoSettings, skip: Iterable[str] = ()
) -> list[tuple[float, str, float]]:
    """The customer's last distinct products before `ts`: (ts, product, weight), newest first.

    Reads `recent` (views and adds) and `purchased`; products in `skip` (the
    current event's own) are left out.
    """
    limit = settings.history_items
    horizon = ts - settings.history_window_s
    seen = set(skip)
    out: list[tuple[float, str, float]] = []
    view, add = settings.view_weight, settings.add_weight
    for entry in reversed(profile.recent):
        then = entry[0]
        if then < horizon:
            break
        item = entry[2]
        if item is None or item in seen or then > ts:
            continue
        name = entry[1]
        if name == VIEW:
            w = view
        elif name == ADD:
            w = add
        else:
            continue
        seen.add(item)
        out.append((then, item, w))
        if len(out) >= limit:
            return out
    bought = settings.purchase_weight
    for then, item in reversed(profile.purchased):
        if then < horizon:
            break
        if item in seen or then > ts:
            continue
        seen.add(item)
        out.append((then, item, bought))
        if len(out) >= limit:
            break
    return out

"""The content cache: an in-process LRU in front of a shared (Redis) cache.

Per key it serves fresh values from memory, serves stale values at once while one
background refresh runs (stale-while-revalidate), and lets a burst of misses for
one key share a single load (coalescing). Times come from an injected clock; a
value's age is measured from when it was fetched, so every worker agrees on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisError

from engine.clock import Clock, SystemClock

log = logging.getLogger(__name__)

LOCAL, SHARED, UPSTREAM = "local", "shared", "upstream"


# Made per answer, never changed after: not frozen, since a frozen dataclass sets every
# field through object.__setattr__ (about three times the cost of an instance).
@dataclass(slots=True)
class Entry:
    """A cached value and the epoch second it was fetched upstream."""

    data: Any
    fetched_at: float
    # The value's HTML fragment once rendered: a cached value is rendered once, not per hit.
    rendered: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(slots=True)
class Hit:
    """A value for a key: where it came from and whether it is past its TTL."""

    entry: Entry
    via: str  # local, shared or upstream
    stale: bool = False


@dataclass(frozen=True, slots=True)
class Policy:
    """How long a key's value is fresh, and how long after that it may be served stale."""

    ttl_s: float
    stale_s: float
    store: bool = True

    @property
    def keep_s(self) -> float:
        """How long a value is worth keeping at all."""
        return self.ttl_s + self.stale_s


class LocalCache:
    """A bounded LRU map of key -> Entry (one event loop; no locking needed)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._data: OrderedDict[str, Entry] = OrderedDict()

    def get(self, key: str) -> Entry | None:
        """The entry for `key`, marking it recently used."""
        entry = self._data.get(key)
        if entry is not None:
            self._data.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Store `entry`, evicting the least recently used beyond the bound."""
        if self.max_entries <= 0:
            return
        self._data[key] = entry
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def discard(self, key: str) -> None:
        """Forget `key`."""
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


class SharedCache(Protocol):
    """A cache every API worker sees; failures must read as misses, never raise."""

    async def get(self, key: str) -> Entry | None: ...

    def set_later(self, key: str, entry: Entry, keep_s: float) -> None:
        """Queue `entry` to be stored for `keep_s` seconds; never waits, never raises."""


# How long a write waits for a read to share its round trip with (a cache: a few ms
# later in Redis costs at most another worker one upstream call).
WRITE_DELAY_S = 0.005
_TOO_LATE = object()  # what a read gets when Redis has not answered within timeout_s


def _too_late(gets: dict[str, list[asyncio.Future]]) -> None:
    for futures in gets.values():
        for future in futures:
            if not future.done():
                future.set_result(_TOO_LATE)


class RedisCache:
    """SharedCache on Redis. Reads and writes made in one event-loop tick go as one
    pipeline (an MGET and the SETs), so a busy worker pays one round trip per tick,
    not one per key. Each read waits at most `timeout_s`; any failure is a miss."""

    def __init__(self, client: Any, *, timeout_s: float, prefix: str = "nudge:content:"):
        self.redis = client
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.errors = 0
        self.round_trips = 0
        self._gets: dict[str, list[asyncio.Future]] = {}
        self._sets: dict[str, tuple[bytes, int]] = {}
        self._scheduled = False
        self._write_timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task] = set()

    async def get(self, key: str) -> Entry | None:
        """The entry for `key`, or None if absent, unreadable, slow or Redis is down."""
        future = asyncio.get_running_loop().create_future()
        self._gets.setdefault(key, []).append(future)
        self._schedule()
        raw = await future  # by the round trip, or _TOO_LATE by its timer
        if raw is _TOO_LATE:
            self.errors += 1
            return None
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
            return Entry(value["d"], float(value["t"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.errors += 1
            return None

    async def set(self, key: str, entry: Entry, keep_s: float) -> None:
        """`set_later`, for callers that await."""
        self.set_later(key, entry, keep_s)

    def set_later(self, key: str, entry: Entry, keep_s: float) -> None:
        """Queue `entry` to be stored for `keep_s` seconds, with the next round trip.

        Writes wait up to WRITE_DELAY_S for a read to travel with: one round trip
        instead of two when requests come one at a time.
        """
        try:
            payload = orjson.dumps({"d": entry.data, "t": entry.fetched_at})
        except TypeError:
            self.errors += 1
            return
        self._sets[key] = (payload, max(int(keep_s * 1000), 1))
        if not self._scheduled and self._write_timer is None:
            self._write_timer = asyncio.get_running_loop().call_later(WRITE_DELAY_S, self._flush)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        gets, self._gets = self._gets, {}
        sets, self._sets = self._sets, {}
        if gets or sets:
            task = asyncio.ensure_future(self._round_trip(gets, sets))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        if gets:
            # One timer for the tick's reads, not a timeout per read: a slow Redis is a miss.
            timer = asyncio.get_running_loop().call_later(self.timeout_s, _too_late, gets)
            task.add_done_callback(lambda _: timer.cancel())

    async def _round_trip(
        self, gets: dict[str, list[asyncio.Future]], sets: dict[str, tuple[bytes, int]]
    ) -> None:
        keys = list(gets)
        values: list[Any] = [None] * len(keys)
        self.round_trips += 1
        try:
            # Bounds the whole trip, connecting included: the service's client has no
            # socket timeout of its own (engine.store.connect, socket_timeout=None).
            async with asyncio.timeout(max(self.timeout_s * 5, 0.1)):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, (payload, px) in sets.items():  # first: a read sees this tick's writes
                        pipe.set(self.prefix + key, payload, px=px)
                    if keys:
                        pipe.mget([self.prefix + k for k in keys])
                    replies = await pipe.execute()
            if keys:
                values = replies[-1]
        except (RedisError, OSError, TimeoutError):
            self.errors += 1
        for key, value in zip(keys, values, strict=True):
            for future in gets[key]:
                if not future.done():
                    future.set_result(value)

    async def aclose(self) -> None:
        """Wait briefly for round trips in flight (pending writes included)."""
        if self._scheduled or self._write_timer is not None:
            self._flush()
        if self._running:
            await asyncio.wait(list(self._running), timeout=self.timeout_s * 5)


class MemorySharedCache:
    """SharedCache in a dict, with controls, for tests and single-process use."""

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or SystemClock()
        self.data: dict[str, tuple[Entry, float]] = {}
        self.gets = 0
        self._fail = 0

    def fail_next(self, n: int = 1) -> None:
        """Make the next `n` calls behave as if the cache were down."""
        self._fail += n

    async def get(self, key: str) -> Entry | None:
        """The entry for `key` unless expired (or failing)."""
        self.gets += 1
        if self._fail:
            self._fail -= 1
            return None
        found = self.data.get(key)
        if found is None or found[1] <= self.clock.now():
            return None
        return found[0]

    async def set(self, key: str, entry: Entry, keep_s: float) -> None:
        """`set_later`, for callers that await."""
        self.set_later(key, entry, keep_s)

    def set_later(self, key: str, entry: Entry, keep_s: float) -> None:
        """Store `entry` until `keep_s` from now."""
        if self._fail:
            self._fail -= 1
            return
        self.data[key] = (entry, self.clock.now() + keep_s)


Loader = Callable[[], Awaitable[Any]]


class TieredCache:
    """Local LRU, then the shared cache, then the loader; SWR and coalescing per key."""

    def __init__(
        self, local: LocalCache, shared: SharedCache | None = None, *, clock: Clock | None = None
    ):
        self.local = local
        self.shared = shared
        self.clock = clock or SystemClock()
        self.stats: Counter[str] = Counter()
        self._loading: dict[str, asyncio.Task] = {}
        self._refreshing: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()

    def peek(self, key: str, policy: Policy, load: Loader) -> Hit | None:
        """A usable value already in memory (starting a refresh if stale), without awaiting."""
        if not policy.store:
            return None
        entry = self.local.get(key)
        if entry is None:
            return None
        age = self.clock.now() - entry.fetched_at
        if age <= policy.ttl_s:
            self.stats["local_hit"] += 1
            return Hit(entry, LOCAL)
        if age <= policy.keep_s:
            self.stats["stale_served"] += 1
            self._refresh(key, policy, load)
            return Hit(entry, LOCAL, stale=True)
        self.local.discard(key)
        return None

    async def get(self, key: str, policy: Policy, load: Loader) -> Hit:
        """The value for `key`: from memory, the shared cache, or one coalesced load."""
        hit = self.peek(key, policy, load)
        if hit is not None:
            return hit
        # shield: a caller that gives up must not cancel the load others wait for
        return await asyncio.shield(self.loading(key, policy, load))

    def loading(self, key: str, policy: Policy, load: Loader) -> asyncio.Future[Hit]:
        """The load of `key` in flight (shared cache, then `load`), started if there is none.

        For a caller that has `peek`ed already and waits without a task of its own.
        The load is shared: a caller that gives up must leave it running (never
        cancel it), for the others waiting and to fill the cache for the next.
        """
        task = self._loading.get(key)
        if task is None:
            self.stats["miss"] += 1
            task = self._spawn(self._resolve(key, policy, load))
            self._loading[key] = task
            task.add_done_callback(lambda _t, k=key: self._loading.pop(k, None))
        else:
            self.stats["coalesced"] += 1
        return task

    async def _resolve(self, key: str, policy: Policy, load: Loader) -> Hit:
        if self.shared is not None and policy.store:
            entry = await self.shared.get(key)
            if entry is not None:
                age = self.clock.now() - entry.fetched_at
                if age <= policy.keep_s:
                    self.local.put(key, entry)
                    self.stats["shared_hit"] += 1
                    if age > policy.ttl_s:
                        self.stats["stale_served"] += 1
                        self._refresh(key, policy, load)
                        return Hit(entry, SHARED, stale=True)
                    return Hit(entry, SHARED)
        return Hit(await self._load(key, policy, load), UPSTREAM)

    async def _load(self, key: str, policy: Policy, load: Loader) -> Entry:
        self.stats["upstream"] += 1
        try:
            data = await load()
        except BaseException:
            self.stats["upstream_failed"] += 1
            raise
        entry = Entry(data, self.clock.now())
        if policy.store:
            self.local.put(key, entry)
            if self.shared is not None:
                self.shared.set_later(key, entry, policy.keep_s)
        return entry

    def _refresh(self, key: str, policy: Policy, load: Loader) -> None:
        if key in self._refreshing:
            return
        self.stats["refresh"] += 1
        task = self._spawn(self._load(key, policy, load))
        self._refreshing[key] = task
        task.add_done_callback(lambda _t, k=key: self._refreshing.pop(k, None))

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._settle)
        return task

    def _settle(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so a load whose waiters all gave up logs no asyncio warning.
            log.debug("content load failed: %r", task.exception())

    async def aclose(self) -> None:
        """Cancel loads and refreshes still running."""
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task

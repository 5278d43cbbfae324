"""Answer one content request: profile read, fan-out of blocks, fallbacks, all by a deadline.

The path of a request:
0. One deadline: now + deadline_ms - reserve_ms - twice how late the loop runs timers lately.
1. Sources that need only the customer id start at once (cache first).
2. The live profile is read from its shard (coalesced per shard by ShardClient).
   It is never cached, so profile-derived blocks are as fresh as the shard.
3. Profile-derived blocks are computed inline; the recommender and the other
   sources run in parallel, each within min(its budget, what remains).
4. At the deadline every block has a value or its fallback; stragglers are
   cancelled, never awaited. A source's failure costs only its own block.
Identical requests in flight together share one answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from engine.clock import Clock, SystemClock
from engine.content import blocks as b
from engine.content import render
from engine.content.cache import (
    UPSTREAM,
    Hit,
    LocalCache,
    Policy,
    RedisCache,
    SharedCache,
    TieredCache,
)
from engine.content.config import BUILTIN_BLOCKS, ContentConfig
from engine.content.deadline import (
    ERROR,
    TIMEOUT,
    BlockFailure,
    Deadline,
    Job,
    LagMeter,
    Outcome,
    follow,
    start,
)
from engine.content.http1 import Http1Transport
from engine.content.recommend import RecentInterestRecommender, Recommender
from engine.content.request import ContentRequest
from engine.content.sources import HttpSource, Transport
from engine.content.template import Template
from engine.errors import NotFound

log = logging.getLogger(__name__)

ProfileReader = Callable[[str], Awaitable[dict | None]]

# Block sources as the answer names them.
LIVE, RECOMMENDER, CACHE, FALLBACK = "profile", "recommender", "cache", "fallback"
# Why a profile-derived block has no profile.
UNKNOWN, PROFILE_TIMEOUT, PROFILE_UNAVAILABLE = (
    "unknown_customer",
    "profile_timeout",
    "profile_unavailable",
)


# Made per answer, never changed after: not frozen, since a frozen dataclass sets every
# field through object.__setattr__ (about three times the cost of an instance).
@dataclass(slots=True)
class BlockResult:
    """One block of an answer."""

    name: str
    data: Any
    html: str
    source: str
    fallback: bool = False
    reason: str | None = None
    age_s: float = 0.0
    stale: bool = False


@dataclass(slots=True)
class Answer:
    """A whole answer: its blocks in request order, and those left out."""

    customer_id: str
    profile_id: str | None
    profile: str  # ok, or why there is none
    blocks: list[BlockResult]
    omitted: list[str]
    deadline_ms: int
    # Seconds from the start of the request until each block had its value (metrics).
    timings: dict[str, float] = field(default_factory=dict)
    # The encoded answer per format, made once for every request that shares it.
    encoded: dict[str, tuple[str, bytes]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def fallbacks(self) -> list[str]:
        """Names of the blocks that are fallbacks (or omitted)."""
        return [r.name for r in self.blocks if r.fallback] + self.omitted


class ContentService:
    """Holds what content requests share: the HTTP client, the caches, the recommender."""

    def __init__(
        self,
        config: ContentConfig,
        *,
        redis_url: str | None = None,
        shared: SharedCache | None = None,
        transport: Transport | None = None,
        recommender: Recommender | None = None,
        clock: Clock | None = None,
    ):
        self.config = config
        self.clock = clock or SystemClock()
        self.recommender = recommender or RecentInterestRecommender()
        self._redis_url = redis_url if config.redis_cache else None
        self._redis: Any = None
        self._own_transport = transport is None
        self.transport = transport or Http1Transport(max_connections=config.http_max_connections)
        self.cache = TieredCache(LocalCache(config.local_cache_entries), shared, clock=self.clock)
        self.sources = {s.name: HttpSource(s, self.transport) for s in config.sources}
        self._policies = {
            s.name: Policy(s.ttl_s, s.stale_s, store=s.cache and s.ttl_s + s.stale_s > 0)
            for s in config.sources
        }
        self._renderers = {s.name: render.SourceRenderer(s) for s in config.sources}
        self._fallback_html = {
            name: Template(text) if text else None
            for name, text in [(n, config.block(n).fallback_html) for n in BUILTIN_BLOCKS]
            + [(s.name, s.fallback_html) for s in config.sources]
        }
        self.links = b.Links(config.product_url, config.checkout_url)
        self.stats: Counter[str] = Counter()
        self._answering: dict[tuple, _Fill] = {}
        self.lag = LagMeter()

    async def start(self) -> None:
        """Open the pooled HTTP client and the Redis cache connection (on the running loop)."""
        self.lag.start()
        if self._own_transport and isinstance(self.transport, Http1Transport):
            await self.transport.start()
        if self._redis_url and self.cache.shared is None:
            from engine.store import connect

            # Every call of this client is a RedisCache round trip, under that round
            # trip's own timeout: no socket timeout per reply on top of it.
            self._redis = connect(self._redis_url, socket_timeout=None)
            self.cache.shared = RedisCache(
                self._redis, timeout_s=self.config.redis_timeout_ms / 1000.0
            )

    async def close(self) -> None:
        """Stop background loads; close the HTTP client and Redis."""
        await self.lag.stop()
        await self.cache.aclose()
        if isinstance(self.cache.shared, RedisCache):
            await self.cache.shared.aclose()
        if self._own_transport and isinstance(self.transport, Http1Transport):
            await self.transport.close()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # -- one request ----------------------------------------------------------
    async def answer(self, read_profile: ProfileReader, request: ContentRequest) -> Answer:
        """Every requested block, each a value or its fallback, by the request's deadline.

        Identical requests in flight together (an ESP's HTML, text and AMP passes for
        one recipient) share one answer: the one that came later has the same deadline
        and started no earlier, so the shared answer is ready within its deadline too.
        """
        key = (request.customer_id, request.blocks, request.deadline_ms, _options_key(request))
        fill = self._answering.get(key)
        if fill is not None:
            self.stats["answers_shared"] += 1
            return await fill.join()
        loop = asyncio.get_running_loop()
        # Kept back: the reserve to build and send the answer, plus twice how late the
        # loop has lately run timers (about one iteration of a busy loop): the deadline's
        # timer fires that late, and the caller resumes one iteration after it. Never
        # more than half the deadline.
        total = request.deadline_ms / 1000.0
        reserve = min(self.config.reserve_ms / 1000.0 + 2 * self.lag.recent(), total / 2)
        fill = _Fill(self, request, Deadline(loop.time() + total - reserve), loop)
        self._answering[key] = fill
        fill.on_finish = partial(self._answered, key)
        waiter = fill.join()
        fill.begin(read_profile)
        return await waiter

    def _answered(self, key: tuple) -> None:
        self._answering.pop(key, None)

    async def _read(self, read_profile: ProfileReader, cid: str) -> tuple[dict | None, str]:
        try:
            profile = await read_profile(cid)
        except Exception as exc:  # a shard that cannot answer costs the profile blocks only
            log.warning("content: profile read for %r failed: %r", cid, exc)
            self.stats["profile_unavailable"] += 1
            return None, PROFILE_UNAVAILABLE
        return (profile, "ok") if profile is not None else (None, UNKNOWN)

    def _builtin(
        self,
        name: str,
        profile: dict,
        request: ContentRequest,
        deadline: Deadline,
        done: dict,
        tasks: list[tuple[str, asyncio.Future[Outcome]]],
    ) -> None:
        settings = self.config.block(name)
        limit = request.option(name).get("limit", settings.limit)
        try:  # pure and fast: computed inline, no task
            if name == "recommendations":
                found = self.recommender.recommend(profile, limit=limit)
                if inspect.isawaitable(found):  # a recommender doing I/O: run it in parallel
                    budget = settings.timeout_ms / 1000.0 if settings.timeout_ms else None
                    job = Job(name, budget, partial(self._recommend_later, found, request))
                    tasks.append((name, start(job, deadline)))
                    return
                done[name] = self._recommendations(found, request.customer_id)
                return
            if name == "profile":
                data = b.profile_data(profile, traits=self.config.profile_traits)
                html = render.profile_html(data)
            elif name == "cart":
                data = b.cart_data(profile, self.links)
                html = render.cart_html(data)
            else:
                data = b.recently_viewed_data(profile, self.links, limit=limit)
                html = render.products_html(data, name)
            done[name] = BlockResult(name, data, html, LIVE)
        except BlockFailure as exc:
            done[name] = Outcome(name, failure=exc.reason, detail=str(exc))
        except Exception as exc:
            log.warning("content block %s failed: %r", name, exc)
            done[name] = Outcome(name, failure="error", detail=type(exc).__name__)

    async def _recommend_later(
        self, found: Awaitable[list[dict]], request: ContentRequest
    ) -> BlockResult:
        return self._recommendations(await found, request.customer_id)

    def _recommendations(self, items: list[dict], customer_id: str) -> BlockResult:
        data = b.recommendation_data(items, self.links)
        if not data["items"]:
            raise BlockFailure("no_recommendations")
        html = render.products_html(data, "recommendations")
        return BlockResult("recommendations", data, html, RECOMMENDER)

    def _start_source(
        self,
        source: HttpSource,
        cid: str,
        profile: Mapping[str, Any] | None,
        request: ContentRequest,
        deadline: Deadline,
        done: dict,
        tasks: list,
    ) -> None:
        name = source.name
        upstream = source.request(cid, profile, request.option(name))
        policy = self._policies[name]

        def load() -> Awaitable[Any]:
            return source.fetch(upstream)

        hit = self.cache.peek(upstream.key, policy, load)
        if hit is not None:  # the common case: no task, no await
            done[name] = self._source_result(name, hit)
            return
        # A miss, and no task either: the block follows the shared load with a callback;
        # cut by its budget or the deadline, it leaves the load running for the next.
        loading = self.cache.loading(upstream.key, policy, load)
        convert = partial(self._source_result, name)
        tasks.append((name, follow(name, loading, convert, source.timeout_s, deadline)))

    def _source_result(self, name: str, hit: Hit) -> BlockResult:
        entry = hit.entry
        age = max(self.clock.now() - entry.fetched_at, 0.0)
        html = entry.rendered.get(name)
        if html is None:
            html = entry.rendered[name] = self._renderers[name].render(entry.data)
        return BlockResult(
            name,
            entry.data,
            html,
            UPSTREAM if hit.via == UPSTREAM else CACHE,
            age_s=age,
            stale=hit.stale,
        )

    def _result(self, name: str, value: BlockResult | Outcome, cid: str) -> BlockResult | None:
        if isinstance(value, BlockResult):
            return value
        if value.failure is None:
            return value.value
        self.stats[f"fallback:{value.failure}"] += 1
        source = self.sources.get(name)
        settings = source.config if source is not None else self.config.block(name)
        if settings.on_failure == "omit":
            return None
        return BlockResult(
            name,
            settings.fallback_data,
            render.fallback_html(self._fallback_html.get(name), cid),
            FALLBACK,
            fallback=True,
            reason=value.failure,
        )


class _Fill:
    """One answer being filled in; `finish()` assembles it from whatever is there.

    The deadline is a timer that calls `finish()` itself, and so does the last block
    to complete: the answer is set on every caller's own future in that callback, so
    each caller resumes in the next loop iteration. (Awaiting a gather, then the task
    around it, then a shield would cost several more iterations, each as long as a
    busy loop makes it.) A caller that leaves cancels only its own future.
    """

    def __init__(
        self,
        service: ContentService,
        request: ContentRequest,
        deadline: Deadline,
        loop: asyncio.AbstractEventLoop,
    ):
        self.service = service
        self.request = request
        self.deadline = deadline
        self.loop = loop
        self.on_finish: Callable[[], None] | None = None
        self._waiters: list[asyncio.Future[Answer]] = []
        self._outcome: Answer | Exception | None = None
        self.done: dict[str, BlockResult | Outcome] = {}
        self.tasks: list[tuple[str, asyncio.Future[Outcome]]] = []  # blocks still to come
        self.timings: dict[str, float] = {}
        self.profile: dict | None = None
        self.status: str | None = None  # None while the profile read is in flight
        self.began = loop.time()
        self._waiting = 0  # blocks not done yet, once all are started
        self._timer = loop.call_at(deadline.at, self.finish)
        self._driver: asyncio.Task | None = None

    def join(self) -> asyncio.Future[Answer]:
        """A future of this answer for one caller."""
        waiter = self.loop.create_future()
        if self._outcome is None:
            self._waiters.append(waiter)
        else:
            _settle(waiter, self._outcome)
        return waiter

    def begin(self, read_profile: ProfileReader) -> None:
        """Start the sources that need only the id, then read the profile."""
        svc, request = self.service, self.request
        for name in request.blocks:
            source = svc.sources.get(name)
            if source is not None and not source.needs_profile:
                svc._start_source(source, request.customer_id, None, request, self.deadline,
                                  self.done, self.tasks)  # fmt: skip
        self._stamp()
        self._driver = self.loop.create_task(self._drive(read_profile))

    async def _drive(self, read_profile: ProfileReader) -> None:
        svc, request, cid = self.service, self.request, self.request.customer_id
        try:
            self.profile, self.status = await svc._read(read_profile, cid)
            if self.status == UNKNOWN and svc.config.unknown_customer == "404":
                self._fail(NotFound(f"no customer {cid!r}", field="customer_id"))
                return
            started = {n for n, _ in self.tasks}
            for name in request.blocks:
                if name in self.done or name in started:
                    continue
                if self.profile is None:
                    self.done[name] = Outcome(name, failure=self.status)
                elif name in BUILTIN_BLOCKS:
                    svc._builtin(name, self.profile, request, self.deadline, self.done,
                                 self.tasks)  # fmt: skip
                else:
                    svc._start_source(svc.sources[name], cid, self.profile, request,
                                      self.deadline, self.done, self.tasks)  # fmt: skip
        except Exception as exc:  # a bug here must not keep the answer past the deadline
            log.warning("content: answering %r failed: %r", cid, exc)
        self._stamp()
        self._waiting = sum(1 for _, task in self.tasks if not task.done())
        if not self._waiting:
            self.finish()
            return
        for name, task in self.tasks:
            if not task.done():
                task.add_done_callback(partial(self._block_done, name))

    def _block_done(self, name: str, _block: asyncio.Future[Outcome]) -> None:
        self.timings.setdefault(name, self.loop.time() - self.began)
        self._waiting -= 1
        if self._waiting == 0:
            self.finish()

    def _stamp(self) -> None:  # blocks computed inline or from memory so far
        elapsed = self.loop.time() - self.began
        for name in self.done:
            self.timings.setdefault(name, elapsed)

    def _stop(self) -> None:
        self._timer.cancel()
        if self._driver is not None and self._driver is not asyncio.current_task():
            self._driver.cancel()
        for _, task in self.tasks:
            if not task.done():
                task.cancel()

    def _fail(self, exc: Exception) -> None:
        if self._outcome is None:
            self._stop()
            self._deliver(exc)

    def _deliver(self, outcome: Answer | Exception) -> None:
        self._outcome = outcome
        for waiter in self._waiters:
            _settle(waiter, outcome)
        self._waiters.clear()
        if self.on_finish is not None:
            self.on_finish()

    def finish(self) -> None:
        """Set the answer now: each block's value, or its fallback if it is not there."""
        if self._outcome is not None:
            return
        self._stop()
        svc, request, cid = self.service, self.request, self.request.customer_id
        if self.status is None:  # the profile read is what ran out of time
            svc.stats["profile_timeout"] += 1
        status = self.status or PROFILE_TIMEOUT
        outcomes = dict(self.done)
        for name, task in self.tasks:
            if task.done() and not task.cancelled():
                error = task.exception()
                # A block turns every Exception into its Outcome; what is left is a
                # BaseException (KeyboardInterrupt and the like): this block's error,
                # never a reason to leave the callers unanswered.
                outcomes[name] = (
                    task.result()
                    if error is None
                    else Outcome(name, failure=ERROR, detail=type(error).__name__)
                )
        results, omitted = [], []
        for name in request.blocks:
            value = outcomes.get(name)
            if value is None:  # still running, or never started for want of a profile
                started = any(n == name for n, _ in self.tasks)
                value = Outcome(name, failure=TIMEOUT if started else status)
            result = svc._result(name, value, cid)
            if result is None:
                omitted.append(name)
            else:
                results.append(result)
        svc.stats["answers"] += 1
        pid = self.profile.get("id") if self.profile else None
        self._deliver(Answer(cid, pid, status, results, omitted, request.deadline_ms, self.timings))


def _settle(waiter: asyncio.Future[Answer], outcome: Answer | Exception) -> None:
    if waiter.done():  # its caller left
        return
    if isinstance(outcome, Exception):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)


def _options_key(request: ContentRequest) -> tuple:
    return tuple(sorted((b, tuple(sorted(o.items()))) for b, o in request.options.items()))

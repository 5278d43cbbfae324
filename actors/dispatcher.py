"""The dispatcher: a plain class that moves sends from the shards' outboxes to the ESPs.

`DispatcherActor` is not a Ray actor by itself; `remote_dispatcher_class` wraps
it with `ray.remote` late, and tests may drive it on their own event loop.
Each dispatcher is one consumer (`dispatcher-N`) of the consumer group
"dispatch" on every outbox. On (re)start it first finishes its own pending
entries, then reads new ones; entries another consumer held too long
(`claim_idle_ms`) are claimed with XAUTOCLAIM. Many sends are in flight at
once (`max_inflight`), so a slow ESP never stalls the shards or other ESPs.

Exactly once, as far as an ESP allows: before each attempt the send's record
says "sending"; the outcome is recorded, counted and the entry acknowledged in
one transaction. A send whose record is final is never sent again. A crash
during an ESP call replays that one send with the same idempotency key (the
webhook's Idempotency-Key, SMTP's Message-ID), so an ESP that honours it
delivers once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from redis.exceptions import RedisError

from engine.config import Config
from engine.content.blocks import Links
from engine.delivery import ledger as lg
from engine.delivery.adapters import Adapter, make_adapter
from engine.delivery.compose import Composer, suppression, withdrawn
from engine.delivery.ledger import Ledger
from engine.delivery.message import DeliveryError, PermanentError, TransientError
from engine.delivery.policy import HALF_OPEN, CircuitBreaker, TokenBucket, backoff
from engine.delivery.templates import TemplateError, TemplateSet
from engine.metrics.delivery import DeliveryMetrics
from engine.profile import RESUBSCRIBES
from engine.recs.recommender import CollaborativeRecommender
from engine.store import connect
from engine.tracking import TokenSigner

log = logging.getLogger(__name__)

ProfileSource = Callable[[str], Awaitable[dict | None]]
_BLOCK_MS = 250
_MAX_SURPRISES = 5  # unexpected errors (an unreachable shard) before a send is dead-lettered
# What a shard attaches to a send (ShardActor._with_profiles).
SNAPSHOT_FIELDS = ("profile", "profile_at")


_RECOMMEND_TIMEOUT_S = 0.2


def dispatcher_name(index: int) -> str:
    """The Ray actor name, and the consumer name, of dispatcher `index`."""
    return f"dispatcher-{index}"


class DispatcherActor:
    """One consumer of every outbox; delivers sends through the configured ESPs."""

    def __init__(
        self,
        index: int,
        config: Config,
        redis_url: str,
        *,
        profiles: ProfileSource | None = None,
        autostart: bool = True,
        rand: Callable[[], float] = random.random,
    ):
        self.index = index
        self.config = config
        self.delivery = config.delivery
        self.redis_url = redis_url
        self.consumer = dispatcher_name(index)
        self._profiles = profiles
        self._rand = rand
        self.templates = TemplateSet(self.delivery.templates_dir)
        self.composer = Composer(
            self.delivery,
            signer=TokenSigner(config.tracking.tracking_secret, config.tracking.public_url),
            links=Links(config.content.product_url, config.content.checkout_url),
            templates=self.templates,
        )
        share = max(self.delivery.dispatchers, 1)
        self.breakers = {
            esp.name: CircuitBreaker(
                failures=self.delivery.breaker_failures, reset_s=self.delivery.breaker_reset_s
            )
            for esp in self.delivery.esps
        }
        # The ESP's rate is shared by the dispatchers: each takes its part.
        self.buckets = {
            esp.name: TokenBucket(esp.rate_per_s / share, now=time.monotonic())
            for esp in self.delivery.esps
        }
        self.adapters: dict[str, Adapter] = {}
        self.stats = {"sent": 0, "suppressed": 0, "holdout": 0, "dead_lettered": 0, "failed": 0}
        self.meters = DeliveryMetrics()
        self.recommender = (
            CollaborativeRecommender(redis_url, config.recs) if config.recs.recs_enabled else None
        )
        self.ready = False
        self._inflight: dict[asyncio.Task, tuple[int, str]] = {}
        self._stopping = False
        self._ledger: Ledger | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        if autostart:
            self._task = asyncio.get_event_loop().create_task(self._run())

    async def start(self) -> None:
        """Start the loop on the running event loop (when built with autostart=False)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    # -- the loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        settings = self.config.engine
        self._ledger = Ledger(
            connect(self.redis_url), settings.shards, ttl_s=self.delivery.ledger_days * 86400.0
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.delivery.max_inflight)
        )
        self.adapters = {
            esp.name: make_adapter(esp, session=self._session) for esp in self.delivery.esps
        }
        if self._profiles is None:
            self._profiles = _ray_profiles(self.config)
        while not self._stopping:
            try:
                await self._ledger.ensure_groups()
                await self._resume_own()
                break
            except (RedisError, OSError) as exc:
                log.warning("%s: start failed (%s); retrying", self.consumer, exc)
                await asyncio.sleep(0.5)
        self.ready = True
        last_claim = last_touch = time.monotonic()
        claim_every = self.delivery.claim_idle_ms / 1000.0 / 2
        touch_every = self._touch_every_s()
        while not self._stopping:
            try:
                now = time.monotonic()
                if now - last_touch >= touch_every:
                    # Before anything else: with every slot held by slow sends (a long
                    # backoff, an open breaker) they must still not look abandoned.
                    last_touch = now
                    await self._touch()
                free = self.delivery.max_inflight - len(self._inflight)
                if free <= 0:
                    await asyncio.wait(
                        list(self._inflight),
                        timeout=_BLOCK_MS / 1000,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    continue
                # COUNT applies per stream: split what is free over the shards' outboxes.
                per_stream = max(min(free, self.delivery.read_count) // settings.shards, 1)
                entries = await self._ledger.read(
                    self.consumer, count=per_stream, block_ms=_BLOCK_MS
                )
                self._start_all(entries)
                now = time.monotonic()
                if now - last_claim >= claim_every:
                    last_claim = now
                    claimed = await self._ledger.claim(
                        self.consumer,
                        min_idle_ms=self.delivery.claim_idle_ms,
                        count=max(free, 1),
                    )
                    self._start_all(claimed)
            except (RedisError, OSError) as exc:
                log.warning("%s: Redis error (%s); retrying", self.consumer, exc)
                if "NOGROUP" in str(exc):  # Redis was emptied or restored: start over
                    with contextlib.suppress(RedisError, OSError):
                        await self._ledger.ensure_groups()
                await asyncio.sleep(0.2)

    async def _resume_own(self) -> None:
        # Entries this consumer read before it crashed: pending under its name.
        after: dict[int, str] = {}
        seen: set[tuple[int, str]] = set()
        while True:
            entries = await self._ledger.read(
                self.consumer, count=self.delivery.read_count, block_ms=None, after=after
            )
            fresh = [e for e in entries if (e[0], e[1]) not in seen]
            if not fresh:
                return
            for index, sid, _ in fresh:
                after[index] = sid
                seen.add((index, sid))
            if fresh:
                log.info("%s: resuming %d pending sends", self.consumer, len(fresh))
            self._start_all(fresh)
            while len(self._inflight) >= self.delivery.max_inflight:
                # Touching, as the main loop does: a slow send (a long backoff, an open
                # breaker) must not let the others look abandoned and be claimed.
                await asyncio.wait(
                    list(self._inflight),
                    timeout=self._touch_every_s(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                await self._touch()

    def _touch_every_s(self) -> float:
        return self.delivery.claim_idle_ms / 1000.0 / 3

    def _start_all(self, entries: list[lg.Entry]) -> None:
        loop = asyncio.get_running_loop()
        busy = set(self._inflight.values())
        for index, sid, send in entries:
            if (index, sid) in busy:
                continue
            task = loop.create_task(self._deliver(index, sid, send))
            self._inflight[task] = (index, sid)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: delivery crashed", self.consumer, exc_info=task.exception())

    async def _touch(self) -> None:
        by_shard: dict[int, list[str]] = {}
        for index, sid in self._inflight.values():
            by_shard.setdefault(index, []).append(sid)
        for index, ids in by_shard.items():
            await self._ledger.touch(self.consumer, index, ids)

    # -- one send -----------------------------------------------------------------------
    async def _deliver(self, index: int, entry_id: str, send: dict) -> None:
        """Deliver one outbox entry to its end: sent, suppressed, holdout or dead-lettered."""
        ledger = self._ledger
        surprises = 0
        while True:
            try:
                await self._deliver_once(ledger, index, entry_id, send)
                return
            except (RedisError, OSError) as exc:
                # The outcome could not be recorded: the entry stays pending; try again.
                if self._stopping:
                    return
                log.warning("%s: Redis error on %s (%s)", self.consumer, send["send_id"], exc)
                await asyncio.sleep(0.5)
            except Exception as exc:  # a shard that cannot answer now, or a bug
                surprises += 1
                if self._stopping:
                    return
                log.warning("%s: %s failed: %r", self.consumer, send["send_id"], exc)
                if surprises >= _MAX_SURPRISES:
                    with contextlib.suppress(RedisError, OSError):
                        await self._dead(index, entry_id, send, 0, f"{type(exc).__name__}: {exc}")
                    return
                await asyncio.sleep(0.2 * surprises)

    async def _deliver_once(self, ledger: Ledger, index: int, entry_id: str, send: dict) -> None:
        customer = send["customer"]
        snapshot = self._snapshot(send)
        if snapshot is not None:
            record, change = await ledger.record_and_consent(index, send["send_id"], customer)
            # An opt-in stored since may postdate the copy: only the shard knows.
            profile = await self._profiles(customer) if change == RESUBSCRIBES else snapshot
        else:
            # The record and the profile in parallel: a final record (rare) wastes one read.
            (record, change), profile = await asyncio.gather(
                ledger.record_and_consent(index, send["send_id"], customer),
                self._profiles(customer),
            )
        if record is not None and record["state"] in lg.FINAL:
            await ledger.ack(index, entry_id)  # already done: never twice
            return
        attempts = record["attempts"] if record else 0
        if not send.get("deliver", True):
            await self._finish(index, entry_id, send, lg.HOLDOUT, attempts, "holdout")
            return
        esp = self.delivery.esp(send.get("esp") or "default")
        if esp is None:
            await self._dead(
                index,
                entry_id,
                send,
                attempts,
                f"no ESP named {send.get('esp')!r} is configured ([[esp]] in config.toml)",
            )
            return
        reason = withdrawn(change) or suppression(profile)
        if reason is not None:
            await self._finish(index, entry_id, send, lg.SUPPRESSED, attempts, reason)
            return
        adapter = self.adapters[esp.name]
        recommended = await self._recommend(profile) if adapter.renders else None
        try:
            email = self.composer.compose(
                send, profile, esp, render=adapter.renders, recommended=recommended
            )
        except (TemplateError, DeliveryError) as exc:
            await self._dead(index, entry_id, send, attempts, exc.message)
            return
        breaker, bucket = self.breakers[esp.name], self.buckets[esp.name]
        last_error = esp_error = ""  # what ended the last attempt; the ESP's own last error
        while True:
            # A call the breaker refuses takes no token: refused attempts used to spend
            # the rate limit, and the calls behind them waited for nothing.
            reserved = not breaker.refuses(time.monotonic())
            wait = bucket.reserve(time.monotonic()) if reserved else 0.0
            if wait > 0:
                await asyncio.sleep(wait)
                # Consent may have been withdrawn while this send waited for its turn.
                reason = withdrawn(await ledger.consent(index, customer))
                if reason is not None:
                    bucket.refund()
                    await self._finish(index, entry_id, send, lg.SUPPRESSED, attempts, reason)
                    return
            attempts += 1
            retry_after = None
            now = time.monotonic()
            probe = breaker.state(now) == HALF_OPEN  # if allowed, this call is the probe
            if not breaker.allow(now):
                if reserved:  # the breaker opened, or another took the probe, meanwhile
                    bucket.refund()
                last_error = f"circuit open for ESP {esp.name!r}" + (
                    f" (last error: {esp_error})" if esp_error else ""
                )
                await ledger.count_failure(index, send)
                self.stats["failed"] += 1
                wait = breaker.retry_in(time.monotonic())
            else:
                # "sending" only carries the attempt count across a crash (the idempotency
                # key, not this record, makes a re-send harmless): write it alongside the call.
                marked = asyncio.ensure_future(
                    ledger.mark_sending(index, send, attempts, time.time())
                )
                failure: DeliveryError | None = None
                try:
                    detail = await adapter.send(email)
                except (TransientError, PermanentError) as exc:
                    failure = exc
                except BaseException:
                    if probe:
                        breaker.release()  # no answer learned: a later call may probe
                    # Settled before anything final is written, which it must not overwrite.
                    with contextlib.suppress(RedisError, OSError):
                        await marked
                    raise
                # The breaker learns the answer before anything else can fail.
                if failure is None or isinstance(failure, PermanentError):
                    breaker.success()  # the ESP answered: it is up
                else:
                    breaker.failure(time.monotonic())
                self.meters.esp_request(esp.name, "ok" if failure is None else "error")
                # Done before any final record, which it must not overwrite. A mark
                # that failed costs nothing but an attempt count a crash would lose.
                with contextlib.suppress(RedisError, OSError):
                    await marked
                if failure is None:
                    await self._record_sent(index, entry_id, send, attempts, detail)
                    return
                if isinstance(failure, PermanentError):
                    await self._dead(index, entry_id, send, attempts, failure.message)
                    return
                last_error = esp_error = failure.message
                retry_after = failure.retry_after
                await ledger.count_failure(index, send)
                self.stats["failed"] += 1
                wait = 0.0
            if attempts >= self.delivery.max_attempts:
                await self._dead(
                    index,
                    entry_id,
                    send,
                    attempts,
                    f"gave up after {attempts} attempts: {last_error}",
                )
                return
            delay = backoff(
                attempts,
                initial_s=self.delivery.backoff_initial_ms / 1000,
                max_s=self.delivery.backoff_max_ms / 1000,
                retry_after_s=retry_after,
                max_retry_after_s=self.delivery.max_retry_after_s,
                rand=self._rand,
            )
            await asyncio.sleep(max(delay, wait))
            # Meanwhile another dispatcher may have claimed and finished it (this one
            # looked stalled), or consent may have been withdrawn.
            record, change = await ledger.record_and_consent(index, send["send_id"], customer)
            if record is not None and record["state"] in lg.FINAL:
                await ledger.ack(index, entry_id)
                return
            reason = withdrawn(change)
            if reason is not None:
                await self._finish(index, entry_id, send, lg.SUPPRESSED, attempts, reason)
                return

    def _snapshot(self, send: dict) -> dict | None:
        # The profile the shard attached when the send left it, if recent enough to
        # stand for the live one (delivery.snapshot_max_age_ms); else None: read it.
        profile, taken = send.get("profile"), send.get("profile_at")
        if not isinstance(profile, dict) or not isinstance(taken, (int, float)):
            return None
        max_age = self.delivery.snapshot_max_age_ms / 1000.0
        # Both ends allow for clocks of two hosts that disagree by a little.
        return profile if -max_age <= time.time() - taken <= max_age else None

    async def _recommend(self, profile: dict | None) -> list[dict] | None:
        # Collaborative filtering (engine.recs) for the email's recommendations block;
        # on any trouble the template falls back to the customer's own recent interest.
        if self.recommender is None or profile is None:
            return None
        try:
            return await asyncio.wait_for(
                self.recommender.recommend(profile, limit=4), _RECOMMEND_TIMEOUT_S
            )
        except Exception as exc:
            log.debug("%s: recommendations unavailable (%r)", self.consumer, exc)
            return None

    async def _record_sent(
        self, index: int, entry_id: str, send: dict, attempts: int, detail: str
    ) -> None:
        # The ESP has taken the send: from here only the record is retried, never the
        # call (a Redis error here used to rerun the whole delivery and send it again).
        retry = False
        while True:
            try:
                if retry:
                    # An error may have come after the record was written (a lost
                    # reply): finishing again would count the send twice.
                    found, _ = await self._ledger.record_and_consent(
                        index, send["send_id"], send["customer"]
                    )
                    if found is not None and found["state"] in lg.FINAL:
                        await self._ledger.ack(index, entry_id)
                        # This dispatcher did send it: its own figures say so.
                        self.stats[lg.SENT] += 1
                        self.meters.sent(send, lg.SENT, time.time())
                        return
                await self._finish(index, entry_id, send, lg.SENT, attempts, detail)
                return
            except (RedisError, OSError) as exc:
                retry = True
                if self._stopping:
                    raise  # left pending: the mid-call case of docs/delivery.md
                log.warning(
                    "%s: %s sent, not yet recorded (%s)", self.consumer, send["send_id"], exc
                )
                await asyncio.sleep(0.5)

    async def _finish(
        self, index: int, entry_id: str, send: dict, state: str, attempts: int, detail: str
    ) -> None:
        await self._ledger.finish(
            index, entry_id, send, state, attempts=attempts, now=time.time(), detail=detail
        )
        self.stats[state] += 1
        self.meters.sent(send, state, time.time())

    async def _dead(self, index: int, entry_id: str, send: dict, attempts: int, error: str) -> None:
        # A replay is later by definition: it reads the live profile, so the copy goes.
        send = {k: v for k, v in send.items() if k not in SNAPSHOT_FIELDS}
        letter = await self._ledger.dead_letter(
            index, entry_id, send, error=error, attempts=attempts, now=time.time()
        )
        self.stats["dead_lettered"] += 1
        log.warning(
            "%s: send %s dead-lettered as %s: %s", self.consumer, send["send_id"], letter, error
        )

    # -- calls --------------------------------------------------------------------------
    async def metrics(self) -> list[dict]:
        """Event-to-ESP latency and ESP requests as plain snapshots, for /metrics."""
        return self.meters.snapshot()

    async def status(self) -> dict:
        """Readiness, in-flight sends, counters and circuit breakers of this dispatcher."""
        now = time.monotonic()
        return {
            "index": self.index,
            "ready": self.ready,
            "pid": os.getpid(),
            "inflight": len(self._inflight),
            "stats": dict(self.stats),
            "breakers": {name: b.state(now) for name, b in self.breakers.items()},
        }

    async def stop(self, timeout: float = 5.0) -> int:
        """Stop reading, let in-flight sends finish for up to `timeout` s; returns those left."""
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), _BLOCK_MS / 1000 + 2)
        left = list(self._inflight)
        if left:
            _, pending = await asyncio.wait(left, timeout=timeout)
            for task in pending:  # they stay pending in Redis: the next start resumes them
                task.cancel()
            left = list(pending)
        for adapter in self.adapters.values():
            await adapter.close()
        if self._session is not None:
            await self._session.close()
        if self._ledger is not None:
            await self._ledger.close()
        if self.recommender is not None:
            await self.recommender.close()
        close_reads = getattr(self._profiles, "aclose", None)
        if close_reads is not None:
            await close_reads()
        return len(left)


def _ray_profiles(config: Config) -> ProfileSource:
    """Profiles read from the named shard actors (coalesced per shard)."""
    from actors.cluster import shard_client

    client = shard_client(config.engine)

    async def profile(customer: str) -> dict | None:
        return await client.profile(customer)

    profile.aclose = client.aclose  # type: ignore[attr-defined]  # its read sockets, at stop()
    return profile


# -- Ray -----------------------------------------------------------------------------
class DispatcherMetrics:
    """The API's /metrics source for the dispatchers: finds them by name, asks each once."""

    def __init__(self, config: Config, *, timeout_s: float = 2.0):
        self.names = [dispatcher_name(i) for i in range(config.delivery.dispatchers)]
        self.namespace = config.engine.ray_namespace
        self.timeout_s = timeout_s
        self._handles: dict[str, Any] = {}

    async def __call__(self) -> list[list[dict] | None]:
        """Each dispatcher's snapshot (None for one that is not there or did not answer)."""
        import ray

        if not self.names or not ray.is_initialized():
            return []

        async def one(name: str) -> list[dict] | None:
            try:
                handle = self._handles.get(name)
                if handle is None:
                    handle = self._handles[name] = ray.get_actor(name, namespace=self.namespace)
                return await asyncio.wait_for(handle.metrics.remote(), self.timeout_s)
            except Exception as exc:  # gone, restarting, or never started
                self._handles.pop(name, None)
                log.debug("metrics: dispatcher %s did not answer: %r", name, exc)
                return None

        return list(await asyncio.gather(*(one(n) for n in self.names)))


def remote_dispatcher_class(max_restarts: int = -1):
    """DispatcherActor as a restartable Ray actor class (ray.remote applied late)."""
    import ray

    from actors.cluster import ACTOR_CPUS

    return ray.remote(
        num_cpus=ACTOR_CPUS, max_restarts=max_restarts, max_task_retries=-1, max_concurrency=100
    )(DispatcherActor)


def ensure_dispatchers(config: Config, redis_url: str, *, detached: bool = False) -> list:
    """Create the dispatcher actors that do not exist yet; handles to all of them."""
    from actors import cluster

    cls = remote_dispatcher_class()
    nodes = cluster.alive_nodes()
    handles = []
    for index in range(config.delivery.dispatchers):
        options = cluster.actor_options(
            dispatcher_name(index),
            config.engine.ray_namespace,
            detached=detached,
            # After the shards' places, so dispatcher-0 is not always beside shard-0.
            node=cluster.place(config.engine.shards + index, nodes),
        )
        handles.append(cls.options(**options).remote(index, config, redis_url))
    return handles


def wait_dispatchers(handles: list, timeout: float = 60.0) -> None:
    """Block until every dispatcher has resumed its pending sends and reads."""
    from actors.cluster import wait_ready

    wait_ready(handles, timeout, what="dispatcher")


def stop_dispatchers(handles: list, timeout: float = 5.0) -> None:
    """Let every dispatcher finish its in-flight sends, then end the actors."""
    import ray

    try:
        ray.get([h.stop.remote(timeout) for h in handles], timeout=timeout + 5)
    except Exception as exc:  # what is unfinished stays pending and resumes on next start
        log.warning("dispatchers did not stop cleanly: %s", exc)
    for handle in handles:
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)

"""The profile shard: a plain class that moves bytes between Redis and a Partition.

`ShardActor` is not a Ray actor by itself; `actors.cluster` wraps it with
`ray.remote` late, and tests may drive it directly on their own event loop.
Its loop: read the stream in batches, apply in order, checkpoint changed
profiles with the stream position every `checkpoint_interval_ms` or
`checkpoint_events`. On (re)start it loads the checkpoint and replays the
stream after it, so every acknowledged event is applied exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from typing import Any

from redis.exceptions import RedisError

from actors.insight import InsightSettings, ShardInsight
from actors.reads import ReadServer
from engine.clock import Clock, SystemClock
from engine.config import EngineConfig, profile_limits
from engine.heap import QuietHeap
from engine.metrics.shard import ShardMetrics
from engine.partition import APPLIED, Partition
from engine.profile import Profile
from engine.routing import shard_for
from engine.rules import RuleSet
from engine.store import Store, connect, decode_entries, parse_id

log = logging.getLogger(__name__)

_MAX_BLOCK_MS = 250
# How long stop() waits for a cancelled loop to unwind (engine stop is bounded: 10 s).
_UNWIND_S = 2.0
# Applying runs in slices of about this long; decided sends go out after each slice.
APPLY_SLICE_S = 0.01
# A checkpoint encodes its profiles in slices of about this long, applying in between.
ENCODE_SLICE_S = 0.005
# What the shard's loop thread spends its CPU on, timed in place; the process's whole
# CPU ("process") is reported beside them, so the rest (Redis and Ray calls, the
# event loop, the background threads) is the difference.
CPU_ACTIVITIES = ("apply", "decode", "timers", "checkpoint_encode", "heap")


class ShardActor:
    """Owns the customers with `shard_for(id) == index`."""

    def __init__(
        self,
        index: int,
        shards: int,
        settings: EngineConfig,
        redis_url: str,
        *,
        rules: tuple[tuple[str, str], ...] = (),
        clock: Clock | None = None,
        autostart: bool = True,
        insight: InsightSettings | None = None,
        quiet_heap: bool = False,
        serve_reads: bool = False,
        apply_slice_s: float = APPLY_SLICE_S,
    ):
        self.index = index
        self.shards = shards
        self.settings = settings
        self.redis_url = redis_url
        self.clock = clock or SystemClock()
        # Rules travel as TOML text: compiled closures cannot be pickled to a worker.
        compiled = RuleSet.from_sources(rules) if rules else None
        self.rules = (
            compiled if compiled is not None and (compiled.rules or compiled.segments) else None
        )
        # recommendations, RFM and model scores (actors.insight)
        self.insight = ShardInsight(index, shards, insight)
        if self.rules is not None:
            self.rules.recheck_s = self.insight.recheck_s()
        self.partition = Partition(
            lambda customer: shard_for(customer, shards) == index,
            limits=profile_limits(settings),
            rules=self.rules,
            insight=self.insight.live(),
        )
        self.pos = "0-0"
        self.checkpoint_pos = "0-0"
        self.ready = False
        self.failed_events = 0
        # Thread CPU seconds by activity (nudge_shard_cpu_seconds_total): what a shard's
        # time goes on in place, beside other shards, the API and Redis.
        self.cpu_s = dict.fromkeys(CPU_ACTIVITIES, 0.0)
        self.checkpoints = 0
        self.sends_flushed = 0
        self.last_checkpoint_s = 0.0
        self.last_checkpoint_at = 0.0
        self._since_checkpoint = 0
        self._checkpointing: asyncio.Task | None = None
        self._stopping = False
        self.meters = ShardMetrics(index, self.rules)
        # Only in a process of its own (a Ray worker): see engine.heap and _renice.
        self.heap = QuietHeap() if quiet_heap else None
        self.apply_slice_s = apply_slice_s
        # The direct read socket (actors.reads), for clients in other processes.
        self.reads = (
            ReadServer(self.get_profiles) if serve_reads and settings.direct_reads else None
        )
        self._advanced = asyncio.Event() if _has_loop() else None
        self._store: Store | None = None
        self._task: asyncio.Task | None = None
        if autostart:
            self._task = asyncio.get_event_loop().create_task(self._run())

    # -- the loop -------------------------------------------------------------
    async def start(self) -> None:
        """Start the loop on the running event loop (when built with autostart=False)."""
        if self._task is None:
            self._advanced = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        if self._advanced is None:
            self._advanced = asyncio.Event()
        self._store = Store(connect(self.redis_url), self.shards)
        await self.insight.start(connect(self.redis_url), redis_url=self.redis_url)
        while not self._stopping:
            try:
                await self._recover()
                break
            except (RedisError, OSError) as exc:
                log.warning("shard %d: recovery failed (%s); retrying", self.index, exc)
                await asyncio.sleep(0.5)
        if self.heap is not None:
            self.heap.start()  # the recovered profiles are out of the collector's way
            _renice(self.settings.shard_niceness)
        # Listening before ready, so a client that sees ready finds the endpoint too.
        await self._start_reads()
        self.ready = True
        log.info(
            "shard %d ready at %s with %d profiles",
            self.index,
            self.pos,
            len(self.partition.profiles),
        )
        interval = self.settings.checkpoint_interval_ms / 1000.0
        # Never block near the client's socket timeout (redis-py: 5 s) and wake
        # at least every 250 ms, so timers and stop() are never kept waiting.
        idle_ms = max(min(int(interval * 500), _MAX_BLOCK_MS), 1)
        while not self._stopping:
            try:
                block_ms = idle_ms
                deadline = self.partition.next_deadline()
                if deadline is not None:
                    block_ms = max(min(idle_ms, int((deadline - self.clock.now()) * 1000)), 1)
                raw = await self._store.read(
                    self.index, self.pos, count=self.settings.read_count, block_ms=block_ms
                )
                started = time.thread_time()
                entries = decode_entries(raw)
                self.cpu_s["decode"] += time.thread_time() - started
                while entries:
                    # A slice at a time: a send decided early in a long read (a backlog
                    # of 200 entries is thousands of events) leaves after its slice,
                    # not after the whole read.
                    entries = entries[self._apply(entries, self.apply_slice_s) :]
                    if self.partition._sends:
                        await self._flush_sends()
                    # Let status, reads and waits in between slices.
                    await asyncio.sleep(0)
                started = time.thread_time()
                self._tick()
                self.cpu_s["timers"] += time.thread_time() - started
                if await self.insight.run_due(self.partition, self.clock.now()):
                    self._since_checkpoint += 1
                if self.partition._sends:
                    await self._flush_sends()
                if self.heap is not None:
                    started = time.thread_time()
                    self.heap.tick()
                    self.cpu_s["heap"] += time.thread_time() - started
                self._reap_checkpoint()
                reason = self._checkpoint_due(interval)
                if reason is not None:
                    # In the background: profiles are encoded a slice at a time while
                    # this loop goes on applying (see Partition.begin_changes).
                    self._start_checkpoint(reason)
            except (RedisError, OSError) as exc:
                log.warning("shard %d: Redis error (%s); retrying", self.index, exc)
                await asyncio.sleep(0.2)

    def _checkpoint_due(self, interval: float) -> str | None:
        """Why a checkpoint should begin now (events, interval, urgent), or None."""
        if self._checkpointing is not None or not self._since_checkpoint:
            return None
        if self._since_checkpoint >= self.settings.checkpoint_events:
            return "events"
        waited = time.monotonic() - self.last_checkpoint_at
        if waited >= interval:
            return "interval"
        if (
            waited >= self.settings.urgent_checkpoint_ms / 1000.0
            and self.partition.has_urgent_changes()
        ):
            return "urgent"
        return None

    async def _start_reads(self) -> None:
        if self.reads is None or self._stopping:
            return
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            # Profiles would leave the node in clear while Ray's own traffic is encrypted.
            log.warning("shard %d: Ray uses TLS; profile reads stay on Ray calls", self.index)
            return
        try:
            # The node's address, not loopback: the API may run on another Ray node.
            await self.reads.start(_node_ip())
        except Exception as exc:  # never keeps the shard from serving: reads go over Ray
            log.warning("shard %d: could not open the direct read socket: %s", self.index, exc)

    async def _recover(self) -> None:
        pos, profiles, aliases, erased = await self._store.load_checkpoint(self.index)
        self.partition = Partition(
            self.partition.owns,
            limits=self.partition.limits,
            rules=self.rules,
            insight=self.insight.live(),
        )
        self.partition.restore(profiles, aliases, erased)
        if self.partition.insight is not None:
            await self.insight.prime(self.partition.insight)
        self.pos = self.checkpoint_pos = pos
        await self._store.deliver_forwards(self.index)
        self.last_checkpoint_at = time.monotonic()

    def _apply(self, entries: list[tuple[str, list]], budget_s: float | None = None) -> int:
        """Apply entries in order until `budget_s` has passed; how many were applied."""
        cpu_started = time.thread_time()
        apply = self.partition.apply
        watched, funnel = self.meters.watched, self.meters.funnel
        until = time.perf_counter() + budget_s if budget_s is not None else math.inf
        applied = 0
        for _sid, events in entries:
            for event in events:
                try:
                    if apply(event) == APPLIED and event.get("event") in watched:
                        funnel.on_event(event)
                except Exception:  # a bug must not wedge the shard; count it and go on
                    self.failed_events += 1
                    log.exception(
                        "shard %d: could not apply event %s", self.index, event.get("messageId")
                    )
            self._since_checkpoint += len(events)
            applied += 1
            if time.perf_counter() >= until:
                break
        self.cpu_s["apply"] += time.thread_time() - cpu_started
        self.pos = entries[applied - 1][0]
        self._advanced.set()
        self._advanced = asyncio.Event()
        return applied

    def _tick(self) -> None:
        try:
            if self.partition.tick(self.clock.now()):
                self._since_checkpoint += 1  # timers changed state: checkpoint it
        except Exception:
            log.exception("shard %d: firing timers failed", self.index)

    async def _flush_sends(self) -> None:
        # Sends leave at once rather than with the next checkpoint, so a send's latency
        # does not depend on the checkpoint interval. A crash before that checkpoint
        # replays the events and decides the same sends again under the same
        # deterministic send_ids, which append_sends keeps out of the outbox.
        sends = self.partition.take_sends()
        try:
            await self._store.append_sends(self.index, self._with_profiles(sends))
        except BaseException:
            self.partition._sends = sends + self.partition._sends
            raise
        self.sends_flushed += len(sends)
        self.meters.on_sends(sends, self.clock.now())

    def _with_profiles(self, sends: list[dict]) -> list[dict]:
        # Each send takes its customer's profile as it is now, so the dispatcher need
        # not call back into this (busy) shard for it; `profile_at` lets the dispatcher
        # read the live profile instead once the copy is old. Copies, not the sends
        # themselves: a failed append requeues the sends, and a later try takes a
        # later profile.
        now = time.time()
        out = []
        for send in sends:
            found = self.partition.lookup(send["customer"])
            if isinstance(found, Profile):
                send = {**send, "profile": found.public(), "profile_at": now}
            out.append(send)
        return out

    def _reap_checkpoint(self) -> None:
        task = self._checkpointing
        if task is None or not task.done():
            return
        self._checkpointing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("shard %d: checkpoint failed (%r); retrying", self.index, task.exception())

    async def _settle_checkpoint(self) -> None:
        """Wait for a checkpoint running in the background, if any."""
        if self._checkpointing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._checkpointing)
            self._reap_checkpoint()

    def _start_checkpoint(self, reason: str) -> asyncio.Task:
        # Every checkpoint starts here, one at a time (callers wait for `_checkpointing`
        # to clear first): two at once share the staging and stage keys and the
        # partition's pending profiles, and the commit that lands second can move the
        # position back over profiles only the other one wrote.
        task = asyncio.get_running_loop().create_task(self._checkpoint(reason))
        self._checkpointing = task
        return task

    async def _checkpoint_in_turn(self, reason: str) -> None:
        """Once no other checkpoint is running, take one now if anything changed."""
        while self._checkpointing is not None:  # another caller may start one meanwhile
            await self._settle_checkpoint()
        if not (self.ready and self._since_checkpoint):
            return
        task = self._start_checkpoint(reason)
        try:
            await asyncio.shield(task)  # its failure is raised here, to the caller
        finally:
            if task.done() and self._checkpointing is task:
                self._checkpointing = None

    async def _checkpoint(self, reason: str = "asked") -> None:
        # Begun synchronously, before any await, so it matches self.pos exactly; the
        # partition keeps each profile as it was here until it is encoded.
        changes = self.partition.begin_changes()
        pos, since = self.pos, self._since_checkpoint
        started = time.perf_counter()
        try:
            while True:
                cpu_started = time.thread_time()
                done = self.partition.encode_pending(ENCODE_SLICE_S)
                self.cpu_s["checkpoint_encode"] += time.thread_time() - cpu_started
                if done:
                    break
                await asyncio.sleep(0)  # let the loop apply events in between
            if changes.sends:  # in the outbox before the checkpoint that covers their events
                await self._store.append_sends(self.index, self._with_profiles(changes.sends))
            await self._store.save_checkpoint(self.index, changes, pos)
        except BaseException:
            self._requeue(changes)
            raise
        self.checkpoint_pos = pos
        self._since_checkpoint -= since  # events applied meanwhile still count
        self.checkpoints += 1
        self.last_checkpoint_at = time.monotonic()
        self.last_checkpoint_s = time.perf_counter() - started
        self.meters.on_checkpoint(
            self.last_checkpoint_s, changes.sends, self.clock.now(), reason=reason
        )
        if changes.forwards:
            await self._store.deliver_forwards(self.index)

    def _requeue(self, changes: Any) -> None:
        # The write failed: mark everything dirty again so the next try carries it.
        part = self.partition
        part._dirty.update(cid for cid in changes.profiles if cid in part.profiles)
        part._dirty.update(cid for cid in part._pending if cid in part.profiles)
        part._pending = {}  # stopped part way through encoding
        part._deleted.update(c for c in changes.deleted if c not in part.profiles)
        part._dirty_aliases.update(a for a in changes.aliases if a in part.aliases)
        # An id aliased again meanwhile is in _dirty_aliases; removing it as well would
        # have the next commit write the new alias and then delete it.
        part._unaliased.update(a for a in changes.unaliased if a not in part.aliases)
        part._new_erased = changes.erased + part._new_erased
        part._forwards = changes.forwards + part._forwards
        part._sends = changes.sends + part._sends

    # -- calls ----------------------------------------------------------------
    async def wait_applied(self, pos: str, timeout: float = 5.0) -> bool:
        """Wait until the stream is applied up to `pos`; False on timeout."""
        target = parse_id(pos)
        deadline = time.monotonic() + timeout
        while not self.ready or parse_id(self.pos) < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waiter = self._advanced
            if waiter is None:
                await asyncio.sleep(0.01)
                continue
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def get_profiles(self, ids: list[str], min_pos: str | None = None) -> list[Any]:
        """Public profiles for `ids`: a dict, the id it was merged into (str), or None.

        With `min_pos`, answer only after the stream is applied up to it, so an
        acknowledged event is visible (read-your-writes).
        """
        if min_pos is not None:
            await self.wait_applied(min_pos)
        out: list[Any] = []
        for customer in ids:
            found = self.partition.lookup(customer)
            out.append(found.public() if hasattr(found, "public") else found)
        return out

    async def read_endpoint(self) -> dict | None:
        """Where and how to read profiles directly: {host, port, token}, or None if not served."""
        return self.reads.endpoint if self.reads is not None and self.ready else None

    async def explain(self, customer: str) -> list[dict] | str | None:
        """Per rule, why `customer` did or did not get an email now; str if merged elsewhere."""
        return self.partition.explain(customer, self.clock.now())

    async def segment_members(self, name: str, limit: int = 100) -> dict:
        """This shard's members of a segment: known, count and up to `limit` ids."""
        return self.partition.segment_members(name, limit)

    async def flush_insight(self) -> None:
        """Flush recommendation counts and merge RFM populations now (tests, admin)."""
        if self.ready:
            await self.insight.flush(self.partition)

    async def status(self) -> dict:
        """Readiness, position, counters and memory of this shard."""
        return {
            "index": self.index,
            "ready": self.ready,
            "pid": os.getpid(),
            "niceness": os.nice(0),
            # as of the last full collection: a live count walks millions of objects,
            # and monitoring polls this (it was 8% of a shard's time at 1 call/s)
            "frozen_objects": self.heap.frozen_at_full if self.heap is not None else 0,
            "heap_refreezes": self.heap.refreezes if self.heap is not None else 0,
            "node": _ray_node_id(),
            "pos": self.pos,
            "checkpoint_pos": self.checkpoint_pos,
            "profiles": len(self.partition.profiles),
            "aliases": len(self.partition.aliases),
            "stats": dict(self.partition.stats),
            "failed_events": self.failed_events,
            "timers": len(self.partition.timers),
            "sends": self.partition.sent,
            "checkpoints": self.checkpoints,
            "last_checkpoint_s": self.last_checkpoint_s,
            "direct_reads": self.reads.status() if self.reads is not None else None,
            "insight": {**self.insight.status(), **self.insight.carried(self.partition)},
            "rss_bytes": _rss_bytes(),
            "cpu_s": self._cpu_seconds(),
        }

    def _cpu_seconds(self) -> dict[str, float]:
        # The loop thread's activities, and the whole process's CPU they are part of.
        return {**self.cpu_s, "process": time.process_time()}

    async def metrics(self) -> list[dict]:
        """This shard's metrics as plain snapshots (engine.metrics.actor), for /metrics."""
        return self.meters.snapshot(
            stats=self.partition.stats,
            failed=self.failed_events,
            cpu=self._cpu_seconds(),
            gauges={
                "nudge_shard_up": 1.0 if self.ready else 0.0,
                "nudge_profiles": len(self.partition.profiles),
                "nudge_aliases": len(self.partition.aliases),
                "nudge_timers": len(self.partition.timers),
                "nudge_shard_memory_bytes": _rss_bytes(),
                "nudge_checkpoint_age_seconds": time.monotonic() - self.last_checkpoint_at,
                "nudge_checkpoint_lag_events": self._since_checkpoint,
                "nudge_stream_position_ms": parse_id(self.pos)[0],
            },
        )

    async def checkpoint_now(self) -> str:
        """Checkpoint at once; returns the checkpointed position."""
        await self._checkpoint_in_turn("asked")
        return self.checkpoint_pos

    async def stop(self) -> str:
        """Stop reading, take a final checkpoint and close; returns its position."""
        self._stopping = True
        if self._task is not None:
            # Let the loop leave between reads: cancelling a blocked XREAD can leave
            # redis-py's connection in a state that stalls the event loop later.
            try:
                await asyncio.wait_for(asyncio.shield(self._task), _MAX_BLOCK_MS / 1000 + 2)
            except TimeoutError:
                self._task.cancel()
                # Until it has unwound, the loop may hold sends it took from the
                # partition: a final checkpoint begun before they are back would
                # cover their events without them, and they would never leave.
                await asyncio.wait({self._task}, timeout=_UNWIND_S)
                if not self._task.done():
                    log.warning("shard %d: loop still running after cancel", self.index)
            except Exception:
                log.exception("shard %d: loop failed while stopping", self.index)
        await self._checkpoint_in_turn("stop")
        if self.ready:
            await self.insight.flush(self.partition)
        await self.insight.close()
        if self.reads is not None:
            await self.reads.close()
        if self._store is not None:
            await self._store.close()
        return self.checkpoint_pos


def _renice(niceness: int) -> None:
    """Set this process's niceness to `niceness` (never lower it: that needs root)."""
    try:
        current = os.nice(0)
        if niceness > current:
            os.nice(niceness - current)
    except OSError as exc:
        log.warning("could not set shard niceness %d: %s", niceness, exc)


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _ray_node_id() -> str | None:
    """The Ray node this shard runs on, or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def _node_ip() -> str:
    """This machine's address as Ray sees it (reachable from the other nodes)."""
    import ray

    return ray.util.get_node_ip_address()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0

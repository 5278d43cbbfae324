"""The API's side of the shards: coalesced, batched calls, one in flight per shard.

Handles are Ray actor handles, or `LocalHandle`s around plain ShardActors
(tests, and single-process use): both answer `handle.method.remote(...)`
with something awaitable. With `direct_reads`, profile reads go to each shard
over its read socket (actors.reads) once Ray has said where it is, and over Ray
whenever that socket is not there or fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from actors.reads import DirectChannel, RemoteReadError
from engine.partition import MAX_ALIAS_HOPS
from engine.routing import shard_for

log = logging.getLogger(__name__)


class LocalHandle:
    """Makes a plain ShardActor look like a Ray handle on the current event loop."""

    def __init__(self, shard: Any):
        self._shard = shard

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._shard, name)

        class _Remote:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                return method(*args, **kwargs)

        return _Remote


# Ids per call: a backlog after a stall goes as several calls, each answer well under
# the read socket's frame cap (profiles of up to ~16 KB) and none a long block of work.
MAX_BATCH = 500


class _Coalescer:
    """Queues profile reads for one shard and sends them as one call at a time."""

    def __init__(self, client: ShardClient, index: int, direct: DirectChannel | None):
        self.client = client
        self.index = index
        self.direct = direct
        self.pending: list[tuple[str, str | None, asyncio.Future]] = []
        self.busy = False

    def submit(self, customer: str, min_pos: str | None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((customer, min_pos, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                positions = [p for _, p, _ in batch if p is not None]
                min_pos = max(positions, key=_id_key) if positions else None
                ids = [c for c, _, _ in batch]
                self.client.stats["profile_calls"] += 1
                self.client.stats["profile_reads"] += len(ids)
                try:
                    results = await self._read(ids, min_pos)
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self.busy = False

    async def _read(self, ids: list[str], min_pos: str | None) -> list[Any]:
        stats = self.client.stats
        if self.direct is not None:
            try:
                results = await self.direct.get_profiles(ids, min_pos)
            except RemoteReadError as exc:
                # The shard's get_profiles raised: the batch goes over Ray, so callers
                # get exactly what they would get without the channel.
                log.warning("shard %d: direct read failed: %s", self.index, exc)
                results = None
            if results is not None:
                stats["direct_calls"] += 1
                return results
        stats["ray_calls"] += 1
        return await self.client.call(self.index, "get_profiles", ids, min_pos)


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class ShardClient:
    """Reads and waits on shards for the API, batching concurrent requests per shard."""

    def __init__(
        self,
        handles: list[Any],
        *,
        resolve: Any = None,
        on_close: Any = None,
        direct_reads: bool = False,
        retry_s: float = 1.0,
    ):
        self.handles = handles
        self._resolve = resolve
        self._on_close = on_close
        self.shards = len(handles)
        # One read channel per shard, None each without direct_reads (LocalHandles:
        # the shard is in this process, and its method is called as it is).
        self.direct: list[DirectChannel | None] = [
            DirectChannel(self._discoverer(i), retry_s=retry_s) if direct_reads else None
            for i in range(len(handles))
        ]
        self._coalescers = [_Coalescer(self, i, self.direct[i]) for i in range(len(handles))]
        self._segment_calls: dict[tuple[str, int], asyncio.Future] = {}
        # profile_calls and profile_reads: how well concurrent reads are coalesced;
        # direct_calls and ray_calls: how those calls went to the shards.
        self.stats: Counter[str] = Counter()

    def _discoverer(self, index: int) -> Any:
        async def discover() -> dict | None:
            return await self.call(index, "read_endpoint")

        return discover

    async def connect_direct(self) -> int:
        """Connect every shard's direct read channel now; how many are connected."""
        channels = [c for c in self.direct if c is not None]
        return sum(await asyncio.gather(*(c.connect() for c in channels)))

    async def call(self, index: int, method: str, *args: Any) -> Any:
        """Call `method` on shard `index`; if its actor is gone for good, find it by name again."""
        try:
            return await getattr(self.handles[index], method).remote(*args)
        except Exception:
            if self._resolve is None:
                raise
            # A shard that was stopped and started again (not a Ray restart) is a new actor.
            self.handles[index] = self._resolve(index)
            return await getattr(self.handles[index], method).remote(*args)

    def shard_of(self, customer: str) -> int:
        """The shard index that owns `customer`."""
        return shard_for(customer, self.shards)

    async def profile(self, customer: str, *, min_pos: dict[int, str] | None = None) -> dict | None:
        """The live profile of `customer` (following merges), or None if unknown."""
        current = customer
        for _ in range(MAX_ALIAS_HOPS + 1):  # as far as shards forward events
            index = self.shard_of(current)
            found = await self._coalescers[index].submit(current, (min_pos or {}).get(index))
            if not isinstance(found, str):
                return found
            current = found
        return None

    async def explain(self, customer: str) -> tuple[str, list[dict]] | None:
        """(canonical id, per-rule explanation) for `customer`, following merges."""
        current = customer
        for _ in range(MAX_ALIAS_HOPS + 1):  # as far as shards forward events
            found = await self.call(self.shard_of(current), "explain", current)
            if not isinstance(found, str):
                return None if found is None else (current, found)
            current = found
        return None

    async def segment_members(self, name: str, limit: int) -> dict | None:
        """Members of segment `name` over all shards (None if no shard knows it).

        One call per shard; concurrent requests for the same segment share those calls.
        """
        key = (name, limit)
        running = self._segment_calls.get(key)
        if running is None:
            running = asyncio.ensure_future(self._segment_members(name, limit))
            self._segment_calls[key] = running
            running.add_done_callback(lambda _: self._segment_calls.pop(key, None))
        return await asyncio.shield(running)

    async def _segment_members(self, name: str, limit: int) -> dict | None:
        parts = await asyncio.gather(
            *(self.call(i, "segment_members", name, limit) for i in range(self.shards))
        )
        if not any(p["known"] for p in parts):
            return None
        members = [m for p in parts for m in p["members"]][:limit]
        return {"count": sum(p["count"] for p in parts), "members": members}

    async def wait_applied(self, index: int, pos: str, timeout: float = 5.0) -> bool:
        """True once shard `index` has applied its stream up to `pos`."""
        return await self.call(index, "wait_applied", pos, timeout)

    async def aclose(self) -> None:
        """Release what the client holds (stops in-process shards, if it owns any)."""
        for channel in self.direct:
            if channel is not None:
                channel.close()
        if self._on_close is not None:
            await self._on_close()

    async def statuses(self, timeout: float = 2.0) -> list[dict | None]:
        """Every shard's status (None for a shard that did not answer in time)."""

        async def one(index: int) -> dict | None:
            try:
                return await asyncio.wait_for(self.call(index, "status"), timeout)
            except Exception:
                return None

        return list(await asyncio.gather(*(one(i) for i in range(self.shards))))

"""Keeps Python's cyclic garbage collector from pausing the engine's long-lived processes.

A full (generation 2) collection walks every tracked object. In a shard that
is every profile's dicts and lists: measured on the ingest benchmark, shards
paused 250-600 ms per full collection and the API 80 ms, about once a second,
which is most of the ingest p99 and event-to-send p99.

So each process freezes what it holds (`gc.freeze`: the collector no longer
walks those objects) once at start and again every `refreeze_s`; the
collector then only ever walks what was allocated since the last freeze. The
engine's data (profiles, events, caches) holds no reference cycles and is
freed by reference counting as usual, frozen or not. What could be missed is
a cycle that was still alive at a freeze and dies later; a full collection of
everything every `full_s` (default an hour) reclaims those.
"""

from __future__ import annotations

import asyncio
import gc
import time

REFREEZE_S = 1.0
FULL_S = 3600.0


class QuietHeap:
    """Call `start()` once the process holds its long-lived state, then `tick()` often."""

    def __init__(self, refreeze_s: float = REFREEZE_S, full_s: float = FULL_S):
        self.refreeze_s = refreeze_s
        self.full_s = full_s
        self.full_collections = 0
        self.refreezes = 0
        # Counting frozen objects walks all of them (37 ms for 2 million), so it is
        # counted when a full collection has just walked everything anyway.
        self.frozen_at_full = 0
        self._next_freeze = 0.0
        self._next_full = 0.0

    def start(self, now: float | None = None) -> None:
        """Collect everything once, then freeze it."""
        now = time.monotonic() if now is None else now
        gc.collect()
        gc.freeze()
        self.frozen_at_full = gc.get_freeze_count()
        self._next_freeze = now + self.refreeze_s
        self._next_full = now + self.full_s

    def tick(self, now: float | None = None) -> None:
        """Freeze what survived since the last tick; now and then, collect everything."""
        now = time.monotonic() if now is None else now
        if now < self._next_freeze:
            return
        self._next_freeze = now + self.refreeze_s
        self.refreezes += 1
        if now >= self._next_full:
            self._next_full = now + self.full_s
            self.full_collections += 1
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.frozen_at_full = gc.get_freeze_count()
        else:
            gc.collect(1)  # young cycles die here, not frozen in
            gc.freeze()

    @staticmethod
    def frozen() -> int:
        """Objects the collector does not walk now (walks them all: not for every call)."""
        return gc.get_freeze_count()


async def keep_heap_quiet(heap: QuietHeap | None = None) -> None:
    """Run a QuietHeap on the current event loop until cancelled (a server's lifespan task)."""
    heap = heap or QuietHeap()
    heap.start()
    while True:
        await asyncio.sleep(heap.refreeze_s)
        heap.tick()

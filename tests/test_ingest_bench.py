"""benchmarks.ingest's helpers: the progress reporter ends with the phase it reports on."""

from __future__ import annotations

import asyncio

from benchmarks.ingest import Tally, with_progress


async def test_progress_stops_when_its_cancel_lands_as_a_status_read_finishes() -> None:
    # Python 3.11's wait_for returns the inner result and drops a cancel that arrives
    # in the same loop iteration; this lines the two up, as a real run once did.
    called = asyncio.Event()
    reads = 0

    async def backlog() -> int:
        nonlocal reads
        reads += 1
        called.set()
        await asyncio.sleep(0)
        return 0

    async def work() -> str:
        await called.wait()
        return "done"

    assert await asyncio.wait_for(with_progress("t", Tally(), work(), backlog), 10) == "done"
    assert reads == 1
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "progress"]

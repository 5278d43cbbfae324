"""benchmarks.ingest's helpers: the progress reporter ends with its phase; event times."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time

import orjson

from benchmarks.ingest import (
    BATCH,
    Catalog,
    Server,
    Tally,
    engine_env,
    make_source,
    parse_args,
    slowest_seconds,
    with_progress,
)
from engine.events import parse_time


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

    reporting = with_progress("t", Tally(), work(), backlog, every=0.01)
    assert await asyncio.wait_for(reporting, 10) == "done"
    assert reads == 1
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "progress"]


def test_events_are_in_time_order_across_requests_stamped_together() -> None:
    # A paced phase stamps all its requests before it starts, dozens per millisecond.
    rng = random.Random(3)
    source = make_source(rng, Catalog.build(rng, 50), "127.0.0.1:0", templates=4)
    times = []
    for request in source.take(300):
        body = orjson.loads(request.split(b"\r\n\r\n", 1)[1])
        times += [parse_time(event["timestamp"], "timestamp") for event in body["batch"]]
    assert len(times) == 300 * BATCH
    assert all(a < b for a, b in itertools.pairwise(times))
    assert abs(times[0] - time.time()) < 60


def test_the_runs_engine_settings_reach_the_server_and_the_callers_do_not(
    tmp_path, monkeypatch
) -> None:
    # The caller's own NUDGE_* must not change what is measured; --checkpoint-ms must.
    monkeypatch.setenv("NUDGE_CHECKPOINT_EVENTS", "7")
    args = parse_args(["--checkpoint-ms", "600000"])
    env = engine_env(args)
    assert env == {"NUDGE_CHECKPOINT_INTERVAL_MS": "600000"}
    script = (
        "import os; print(sorted((k, v) for k, v in os.environ.items() if k.startswith('NUDGE_')))"
    )
    server = Server(
        "env", [sys.executable, "-c", script], cwd=tmp_path, log_path=tmp_path / "out", env=env
    ).start()
    assert server.proc is not None
    server.proc.wait(30)
    assert (tmp_path / "out").read_text().strip() == "[('NUDGE_CHECKPOINT_INTERVAL_MS', '600000')]"
    assert engine_env(parse_args([])) == {}


def test_slowest_seconds_name_the_worst_windows_and_the_rewrites_in_them() -> None:
    tally = Tally()
    since = 1000.0
    for i in range(300):  # three seconds of answers in 5 ms, one of 200 ms in second 1
        started = since + i / 100
        tally.record(200, started, started + (0.2 if i == 150 else 0.005))
    worst = slowest_seconds(tally, since, rewrites={1}, n=2)
    assert len(worst) == 2
    assert worst[0] == {
        "second": 1,
        "requests": 100,
        "over_target": 1,
        "max_ms": 200.0,
        "aof_rewrite": True,
    }
    assert worst[1]["max_ms"] == 5.0 and worst[1]["over_target"] == 0
    assert worst[1]["aof_rewrite"] is False

"""`nudge render`, and shards writing their outbox soon after a decision."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
import redis

from actors.shard import ShardActor
from engine.config import Config
from engine.events import normalize
from engine.store import Store, connect, outbox_key
from tests.conftest import test_config
from tests.factories import track

IMMEDIATE = """
[[rule]]
name = "welcome"
on = "Signed Up"
[[rule.step]]
template = "we-miss-you"
"""


def test_render_previews_a_fixture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.cli import main

    fixture = tmp_path / "ann.json"
    fixture.write_bytes(
        orjson.dumps(
            {
                "profile": {
                    "id": "ann",
                    "traits": {"first_name": "Ann"},
                    "cart": {"p": {"product_id": "p", "name": "Hat", "price": 12}},
                },
                "payload": {"coupon": "HELLO10"},
            }
        )
    )
    assert main(["render", "cart-followup", "--fixture", str(fixture), "--part", "text"]) == 0
    text = capsys.readouterr().out
    assert "Hi Ann," in text and "HELLO10" in text and "Hat" in text and "12.00" in text
    assert main(["render", "cart-followup", "--fixture", str(fixture), "--part", "subject"]) == 0
    assert capsys.readouterr().out.strip() == "Still thinking it over, Ann? Here's HELLO10"
    assert main(["render", "no-such", "--fixture", str(fixture)]) == 2
    assert "no template 'no-such'" in capsys.readouterr().err


async def immediate_shard(config: Config, redis_url: str) -> ShardActor:
    """One shard in process with the IMMEDIATE rule, started and ready."""
    shard = ShardActor(
        0, 1, config.engine, redis_url, rules=((IMMEDIATE, "t.toml"),), autostart=False
    )
    await shard.start()
    while not shard.ready:
        await asyncio.sleep(0.005)
    return shard


async def test_a_decided_send_reaches_the_outbox_long_before_the_checkpoint_interval(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    config = test_config(shards=1, checkpoint_interval_ms=5_000)
    shard = await immediate_shard(config, redis_url)
    store = Store(connect(redis_url), 1)
    try:
        await asyncio.sleep(0.1)  # past the start, where the checkpoint clock begins
        started = time.monotonic()
        await store.append(
            [normalize(track("ann", "Signed Up"), kind=None, received_at=time.time())]
        )
        while not sync_redis.xlen(outbox_key(0)) and time.monotonic() - started < 4:
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
        assert sync_redis.xlen(outbox_key(0)) == 1
        assert elapsed < 2.0  # the 5 s checkpoint interval did not hold it back
        # It carries ann's profile as it was, so a dispatcher need not ask the shard.
        [(_, fields)] = sync_redis.xrange(outbox_key(0))
        send = orjson.loads(fields[b"s"])
        assert send["customer"] == "ann" and send["profile"]["id"] == "ann"
        assert send["profile"]["counts"] == {"Signed Up": 1}
        assert "seen" not in send["profile"]  # the public view, as a shard read gives
        assert abs(send["profile_at"] - time.time()) < 60
    finally:
        await shard.stop()
        await store.close()


async def test_a_send_decided_early_in_a_long_read_leaves_before_the_rest_is_applied(
    redis_url: str, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(connect(redis_url), 1)
    now = time.time()
    # 50 entries waiting before the shard starts: its first read takes them all.
    await store.append([normalize(track("ann", "Signed Up"), kind=None, received_at=now)])
    for i in range(49):
        viewed = track(f"viewer-{i}", "Product Viewed", product_id="p1")
        await store.append([normalize(viewed, kind=None, received_at=now)])
    profiles_at_flush: list[int] = []
    append_sends = Store.append_sends

    async def recording(self: Store, index: int, sends: list) -> None:
        profiles_at_flush.append(len(shard.partition.profiles))
        await append_sends(self, index, sends)

    monkeypatch.setattr(Store, "append_sends", recording)
    config = test_config(shards=1, checkpoint_interval_ms=5_000)
    shard = ShardActor(
        0, 1, config.engine, redis_url, rules=((IMMEDIATE, "t.toml"),), autostart=False,
        apply_slice_s=0.0,  # a slice per entry
    )  # fmt: skip
    await shard.start()
    try:
        started = time.monotonic()
        while len(shard.partition.profiles) < 50 and time.monotonic() - started < 5:
            await asyncio.sleep(0.005)
        assert sync_redis.xlen(outbox_key(0)) == 1
        # Out after the slice that decided it, not after all 50 entries were applied.
        assert profiles_at_flush[0] == 1
    finally:
        await shard.stop()
        await store.close()


async def test_a_send_held_by_a_loop_cancelled_at_stop_leaves_with_the_final_checkpoint(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    # stop() cancels a loop that does not leave in time; the final checkpoint used to
    # begin before the loop had unwound and put back the sends it had taken, so it
    # covered their event without them, and no replay would decide them again.
    config = test_config(
        shards=1, checkpoint_interval_ms=600_000, checkpoint_events=10**9,
        urgent_checkpoint_ms=600_000,
    )  # fmt: skip
    shard = await immediate_shard(config, redis_url)
    store = Store(connect(redis_url), 1)
    real_append = shard._store.append_sends
    redis_back = asyncio.Event()
    calls = 0

    async def stalled(index: int, sends: list) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await redis_back.wait()  # stalled before the write: never set, so cancelled
        return await real_append(index, sends)

    shard._store.append_sends = stalled
    try:
        await store.append(
            [normalize(track("ann", "Signed Up"), kind=None, received_at=time.time())]
        )
        while not calls:
            await asyncio.sleep(0.005)
        await shard.stop()
        assert sync_redis.xlen(outbox_key(0)) == 1
        assert shard.partition._sends == []
    finally:
        await store.close()

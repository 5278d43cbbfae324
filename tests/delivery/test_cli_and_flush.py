"""`nudge render`, and shards writing their outbox soon after a decision."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
import redis

from actors.shard import ShardActor
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


async def test_a_decided_send_reaches_the_outbox_long_before_the_checkpoint_interval(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    config = test_config(shards=1, checkpoint_interval_ms=5_000)
    shard = ShardActor(
        0, 1, config.engine, redis_url, rules=((IMMEDIATE, "t.toml"),), autostart=False
    )
    await shard.start()
    while not shard.ready:
        await asyncio.sleep(0.005)
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
    finally:
        await shard.stop()
        await store.close()

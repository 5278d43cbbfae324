"""Dispatchers as Ray actors: kill -9 of one mid-batch loses nothing and doubles nothing."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import httpx
import orjson
import pytest
import ray
import redis

from actors.cluster import ensure_shards, shard_client, stop_shards, wait_ready
from actors.dispatcher import ensure_dispatchers, stop_dispatchers, wait_dispatchers
from engine.api import create_app
from engine.delivery.config import EspConfig
from engine.delivery.ledger import record_key
from engine.routing import shard_for
from tests.conftest import serve_app, test_config
from tests.delivery.conftest import ADMIN, WRITE, delivery_config, put_send, wait_for
from tests.delivery.servers import Hook

pytestmark = pytest.mark.ray


def test_kill_9_of_a_dispatcher_mid_batch_gives_no_loss_and_no_duplicate(
    ray_cluster, redis_url: str, sync_redis: redis.Redis
) -> None:
    hook = Hook(secret="k", delay_s=0.03)
    customers = [f"r{n}" for n in range(20)]
    sends = [(c, f"send-{c}-{k}") for k in range(15) for c in customers]  # 300
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        config = test_config(shards=4)
        config = dataclasses.replace(
            config, delivery=delivery_config(esp, dispatchers=2, max_inflight=8)
        )
        shards = ensure_shards(config.engine, redis_url)
        wait_ready(shards)

        async def connect():
            return shard_client(config.engine)

        dispatchers = []
        try:
            with (
                serve_app(create_app(config, redis_url, connect)) as base,
                httpx.Client(base_url=base, timeout=10) as client,
            ):
                batch = [
                    {"type": "identify", "userId": c, "traits": {"email": f"{c}@example.com"}}
                    for c in customers
                ]
                assert (
                    client.post("/v1/batch", auth=WRITE, json={"batch": batch}).status_code == 200
                )
                for customer in customers:  # each applied on its shard before sends arrive
                    assert client.get(f"/v1/profiles/{customer}", headers=ADMIN).status_code == 200
                dispatchers = ensure_dispatchers(config, redis_url)
                wait_dispatchers(dispatchers)
                for customer, send_id in sends:
                    put_send(sync_redis, customer, send_id, "hook", rule="r", at=0.0)
                assert wait_for(lambda: len(hook.requests) >= 60)
                victim = ray.get(dispatchers[0].status.remote(), timeout=10)
                assert victim["inflight"] > 0  # mid-batch: sends in flight at the ESP
                os.kill(victim["pid"], signal.SIGKILL)
                wait_for(lambda: len(hook.accepted) == len(sends), timeout=60)
                time.sleep(0.3)
                revived = ray.get(dispatchers[0].status.remote(), timeout=30)
                summary = client.get("/v1/delivery", headers=ADMIN).json()
                scraped = client.get("/metrics", headers=ADMIN).text
        finally:
            stop_dispatchers(dispatchers)
            stop_shards(shards)

    assert revived["pid"] != victim["pid"]  # Ray restarted it
    # Each recorded as sent exactly once.
    assert summary["outcomes"] == [{"rule": "r", "variant": None, "sent": len(sends)}]
    expected = {send_id for _, send_id in sends}
    assert set(hook.accepted) == expected  # no loss
    assert all(r["verified"] for r in hook.requests)
    # A request the killed process had in flight is sent again with the same
    # Idempotency-Key and the same body, which the ESP recognises: one delivery.
    by_key: dict[str, set[bytes]] = {}
    for request in hook.requests:
        by_key.setdefault(request["key"], set()).add(request["body"])
    assert all(len(bodies) == 1 for bodies in by_key.values())
    repeats = len(hook.requests) - len(expected)
    assert repeats <= victim["inflight"]  # only what was in flight at the kill, at most
    for customer, send_id in sends:
        record = orjson.loads(sync_redis.get(record_key(shard_for(customer, 4), send_id)))
        assert record["state"] == "sent"
    assert summary["backlog"] == 0 and summary["pending"] == 0

    # The dispatchers' own metrics reach /metrics (the killed one's counts died with it),
    # each under its own dispatcher label.
    def total(name: str, *labels: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in scraped.splitlines()
            if line.startswith(name) and all(label in line for label in labels)
        )

    assert 0 < total("nudge_send_latency_seconds_count{") <= len(sends)
    assert total("nudge_esp_requests_total{", 'esp="hook"', 'outcome="ok"') > 0
    assert 'nudge_esp_requests_total{dispatcher="' in scraped
    print(
        f"kill -9 mid-batch: {len(hook.requests)} requests for {len(sends)} sends "
        f"({repeats} repeated with the same key; {victim['inflight']} were in flight)"
    )

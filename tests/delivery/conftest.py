"""The whole engine in one process for delivery tests: API, shards and dispatchers on
uvicorn's event loop, a real Redis, real ESP servers on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import httpx
import orjson
import redis

from engine.api import create_app
from engine.clock import ManualClock
from engine.config import Config, load
from engine.delivery.config import DeliveryConfig, EspConfig
from engine.routing import shard_for
from engine.store import outbox_key
from tests.conftest import ROOT, LocalShards, serve_app, test_config

WRITE = ("dev-write-key", "")
ADMIN = {"Authorization": "Bearer dev-admin-key"}


class LocalEngine(LocalShards):
    """LocalShards plus in-process dispatchers reading the profiles from those shards."""

    def __init__(self, config: Config, redis_url: str, clock: object = None, dispatchers: int = 1):
        super().__init__(config, redis_url, clock)
        self.count = dispatchers
        self.dispatchers: list = []

    async def connect(self):
        from actors.dispatcher import DispatcherActor

        client = await super().connect()
        self.dispatchers = [
            DispatcherActor(
                i, self.config, self.redis_url, profiles=client.profile, autostart=False
            )
            for i in range(self.count)
        ]
        for dispatcher in self.dispatchers:
            await dispatcher.start()
        return client

    async def stop(self) -> None:
        for dispatcher in self.dispatchers:
            await dispatcher.stop(timeout=2.0)
        await super().stop()


def delivery_config(*esps: EspConfig, **settings: object) -> DeliveryConfig:
    """Fast retries for tests: 10 ms backoff, 4 attempts."""
    base = {"max_attempts": 4, "backoff_initial_ms": 10, "backoff_max_ms": 50}
    base.update(settings)
    return DeliveryConfig(esps=tuple(esps), **base)


def put_send(r: redis.Redis, customer: str, send_id: str, esp: str, **fields: object) -> bytes:
    """Append a send for `customer` to its shard's outbox (4 shards), as a shard would."""
    send = {
        "send_id": send_id, "rule": "manual", "step": 1, "variant": None, "customer": customer,
        "at": time.time(), "template": "cart-reminder-classic", "esp": esp, "payload": {},
        "deliver": True, "instance": "i", **fields,
    }  # fmt: skip
    return r.xadd(outbox_key(shard_for(customer, 4)), {"s": orjson.dumps(send)})


@contextlib.contextmanager
def engine(
    redis_url: str,
    delivery: DeliveryConfig,
    *,
    clock: ManualClock | None = None,
    rules: bool = True,
    dispatchers: int = 1,
) -> Iterator[tuple[httpx.Client, LocalEngine, Config]]:
    """API + shards (+ the starter rules) + dispatchers; yields (client, engine, config)."""
    config = test_config()
    if rules:
        config = dataclasses.replace(config, rules=load(ROOT / "config.toml", env={}).rules)
    config = dataclasses.replace(config, delivery=delivery)
    local = LocalEngine(config, redis_url, clock, dispatchers=dispatchers)
    with (
        serve_app(create_app(config, redis_url, local.connect)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        yield client, local, config


def wait_for(predicate, timeout: float = 10.0):
    """Poll `predicate` until it is truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)

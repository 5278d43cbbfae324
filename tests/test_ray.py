"""Shards as Ray actors on a two-node cluster: crashes, restarts, and an API in another process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import ray

from actors.client import ShardClient
from actors.cluster import (
    ensure_shards,
    find_shards,
    place,
    shard_client,
    stop_shards,
    usable_nodes,
    wait_ready,
)
from engine.api import create_app
from tests.conftest import free_port, serve_app, test_config
from tests.factories import track

pytestmark = pytest.mark.ray
ADMIN = {"Authorization": "Bearer dev-admin-key"}
WRITE = ("dev-write-key", "")


@pytest.fixture
def ray_api(ray_cluster, redis_url: str):
    """API in this process (uvicorn thread), shards as Ray actors spread over both nodes."""
    config = test_config(shards=4, checkpoint_events=150, checkpoint_interval_ms=5_000)
    handles = ensure_shards(config.engine, redis_url)
    wait_ready(handles)

    async def connect() -> ShardClient:
        return shard_client(config.engine)

    with serve_app(create_app(config, redis_url, connect)) as base:
        yield base, config, handles
    stop_shards(handles)


def statuses(handles: list) -> list[dict]:
    return ray.get([h.status.remote() for h in handles], timeout=30)


def test_shards_spread_over_both_nodes(ray_api) -> None:
    _, _, handles = ray_api
    assert len({s["node"] for s in statuses(handles)}) == 2


def test_shards_run_niced_with_their_profiles_out_of_the_collectors_way(ray_api) -> None:
    _, config, handles = ray_api
    for status in statuses(handles):
        assert status["niceness"] >= config.engine.shard_niceness == 10
        assert status["frozen_objects"] > 0


def test_kill_9_of_a_shard_mid_stream_loses_nothing_and_doubles_nothing(ray_api) -> None:
    base, _config, handles = ray_api
    customers = [f"k{n}" for n in range(8)]
    acked = {c: 0 for c in customers}
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            n = 0
            while not stop.is_set() and n < 400:
                batch = [
                    track(c, "Product Viewed", product_id=str(n))
                    for c in customers
                    for _ in range(5)
                ]
                if client.post("/v1/batch", auth=WRITE, json={"batch": batch}).status_code == 200:
                    for c in customers:
                        acked[c] += 5
                n += 1

    sender = threading.Thread(target=send)
    sender.start()
    victim = handles[0]
    while statuses([victim])[0]["stats"]["applied"] < 300:  # mid-stream, with checkpoints behind it
        time.sleep(0.02)
    before = statuses([victim])[0]
    os.kill(before["pid"], signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    sender.join(60)
    after = statuses([victim])[0]
    assert after["pid"] != before["pid"]  # Ray restarted it
    with httpx.Client(base_url=base, timeout=30) as client:
        counts = {
            c: client.get(f"/v1/profiles/{c}", headers=ADMIN).json()["counts"]["Product Viewed"]
            for c in customers
        }
    assert counts == acked
    assert min(acked.values()) > 100  # far beyond what per-customer dedupe remembers


def test_full_stop_and_start_restores_profiles_exactly(ray_api, redis_url: str) -> None:
    base, config, handles = ray_api
    with httpx.Client(base_url=base, timeout=10) as client:
        batch = [
            track(f"r{n % 5}", "Product Added", product_id=f"p{n}", price=1.5) for n in range(50)
        ]
        assert client.post("/v1/batch", auth=WRITE, json={"batch": batch}).status_code == 200
        before = {f"r{n}": client.get(f"/v1/profiles/r{n}", headers=ADMIN).json() for n in range(5)}
        # Hard stop of every shard, no final checkpoint: recovery replays the stream.
        for handle in handles:
            ray.kill(handle, no_restart=True)
        for _ in range(100):
            try:
                find_shards(config.engine)
                time.sleep(0.05)
            except ValueError:
                break
        revived = ensure_shards(config.engine, redis_url)
        wait_ready(revived)
        after = {f"r{n}": client.get(f"/v1/profiles/r{n}", headers=ADMIN).json() for n in range(5)}
        assert after == before
        # A clean stop (final checkpoint) and start gives the same again.
        stop_shards(revived)
        revived = ensure_shards(config.engine, redis_url)
        wait_ready(revived)
        assert {
            f"r{n}": client.get(f"/v1/profiles/r{n}", headers=ADMIN).json() for n in range(5)
        } == before
    handles[:] = revived


def test_api_in_another_process_finds_shards_by_name(ray_cluster, redis_url: str, tmp_path) -> None:
    namespace = "sep-" + uuid.uuid4().hex[:6]
    port = free_port()
    env = {
        **os.environ,
        "NUDGE_RAY_NAMESPACE": namespace,
        "NUDGE_SHARDS": "4",
        "NUDGE_CHECKPOINT_INTERVAL_MS": "50",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--port",
            str(port),
            "--ray-address",
            ray_cluster.address,
            "--redis-url",
            redis_url,
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "engine did not become healthy"
            time.sleep(0.2)
        assert (
            httpx.post(
                f"{base}/v1/track", auth=WRITE, json=track("sep", "Product Viewed")
            ).status_code
            == 200
        )
        assert httpx.get(f"{base}/v1/profiles/sep", headers=ADMIN, timeout=10).json()["counts"] == {
            "Product Viewed": 1
        }
        shards = httpx.get(f"{base}/v1/status", headers=ADMIN, timeout=10).json()["shards"]
        assert len({s["node"] for s in shards}) == 2  # spread over both nodes
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        # Joined clusters keep detached shards and dispatchers; remove ours.
        for name in [f"shard-{n}" for n in range(4)] + ["dispatcher-0", "dispatcher-1"]:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)


def test_placement_goes_round_robin_over_nodes_and_leaves_one_node_to_ray() -> None:
    assert [place(i, ["a", "b"]) for i in range(5)] == ["a", "b", "a", "b", "a"]
    assert place(3, ["a"]) is None


def test_nodes_without_a_cpu_to_spare_or_not_alive_hold_no_engine_actor() -> None:
    nodes = [
        {"NodeID": "b", "Alive": True, "Resources": {"CPU": 2.0}},
        {"NodeID": "head", "Alive": True, "Resources": {"memory": 1e9}},  # --num-cpus=0
        {"NodeID": "gone", "Alive": False, "Resources": {"CPU": 2.0}},
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 1.0}},
    ]
    assert usable_nodes(nodes) == ["a", "b"]

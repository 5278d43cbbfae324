"""Direct profile reads (actors.reads): each shard's own socket, with Ray only to find it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal

import orjson
import pytest
import ray

from actors.client import MAX_BATCH, LocalHandle, ShardClient
from actors.cluster import ensure_shards, shard_client, stop_shards, wait_ready
from actors.reads import (
    MAX_FRAME,
    MAX_UNAUTHENTICATED,
    DirectChannel,
    ReadConnection,
    ReadServer,
    RemoteReadError,
    encode_frame,
)
from actors.shard import ShardActor
from engine.config import from_mapping
from engine.partition import Partition
from engine.profile import Profile
from engine.routing import shard_for
from engine.rules import RuleSet
from engine.rules.files import STARTER
from engine.store import Store, connect
from tests.conftest import test_config
from tests.factories import normalized, track

SHARDS = 2
RULES = ((STARTER.read_text(encoding="utf-8"), str(STARTER)),)


def on_shard(index: int, prefix: str, count: int = 1) -> list[str]:
    """`count` customer ids owned by shard `index` of SHARDS."""
    found = []
    n = 0
    while len(found) < count:
        if shard_for(f"{prefix}{n}", SHARDS) == index:
            found.append(f"{prefix}{n}")
        n += 1
    return found


def history(user: str, anon: str) -> list[dict]:
    """A shopper with a cart, an order, traits, an anonymous past merged in, and rule state."""
    msgs = [
        track(anon, "Product Viewed", anonymous=True, product_id="p0", category="shoes"),
        {"type": "identify", "userId": user, "anonymousId": anon, "messageId": f"i-{user}"},
        {
            "type": "identify",
            "userId": user,
            "traits": {"email": f"{user}@example.com", "tier": "gold", "tags": ["a", 1, None]},
            "messageId": f"t-{user}",
        },
        track(user, "Product Added", product_id="p1", price=19.5, quantity=2, category="shoes"),
        track(user, "Order Completed", order_id=f"o-{user}", revenue=42.25),
        track(user, "Product Added", product_id="p2", price=3.0),
    ]
    return [normalized(m) for m in msgs]


@contextlib.asynccontextmanager
async def raw(endpoint: dict):
    """A plain TCP connection to a read socket, closed on the way out."""
    reader, writer = await asyncio.open_connection(endpoint["host"], endpoint["port"])
    try:
        yield reader, writer
    finally:
        writer.close()


async def answer(reader: asyncio.StreamReader) -> object:
    size = int.from_bytes(await reader.readexactly(4), "big")
    return orjson.loads(await reader.readexactly(size))


async def closed_silently(reader: asyncio.StreamReader) -> bool:
    """True when the server closes the connection without sending a byte.

    Sooner than the server's own 10 s limit on an unauthenticated connection.
    """
    async with asyncio.timeout(5):
        return await reader.read() == b""


# -- the wire, without Ray ---------------------------------------------------------------


def test_public_profiles_come_through_json_unchanged() -> None:
    # The channel carries profiles as orjson, Ray pickled them: nothing may turn
    # from a tuple into a list, lose a non-str key or a float's precision.
    part = Partition(lambda _: True, rules=RuleSet.from_sources(RULES))
    for event in history("u1", "a1") + history("u2", "a2"):
        part.apply(event)
    profiles = [p for p in part.profiles.values() if isinstance(p, Profile)]
    assert profiles and any(p.journey for p in profiles) and any(p.cart for p in profiles)
    for profile in profiles:
        public = profile.public()
        assert orjson.loads(orjson.dumps(public)) == public


async def test_an_error_in_get_profiles_comes_back_as_an_error_frame() -> None:
    async def answer_or_fail(ids: list[str], min_pos: str | None) -> list:
        if "boom" in ids:
            raise KeyError("boom")
        return [{"id": i, "min_pos": min_pos} for i in ids]

    server = ReadServer(answer_or_fail)
    endpoint = await server.start("127.0.0.1")
    conn = await ReadConnection.open(endpoint)
    try:
        with pytest.raises(RemoteReadError, match="KeyError"):
            await conn.get_profiles(["a", "boom"], None)
        # still in step: the next answer is the next request's
        assert await conn.get_profiles(["b"], "5-0") == [{"id": "b", "min_pos": "5-0"}]
    finally:
        conn.close()
        await server.close()


async def test_finding_the_endpoint_is_tried_at_most_once_per_retry_s() -> None:
    now = 100.0
    asked: list[float] = []

    async def discover() -> dict | None:
        asked.append(now)
        return None  # not ready yet

    channel = DirectChannel(discover, retry_s=1.0, clock=lambda: now)

    async def read() -> None:
        assert await channel.get_profiles(["a"], None) is None  # the caller goes over Ray
        if channel.connecting is not None:
            await channel.connecting

    for _ in range(5):
        await read()
    now = 100.999
    await read()
    assert asked == [100.0]
    now = 101.0
    await read()
    await read()
    assert asked == [100.0, 101.0]


async def test_a_failed_connection_is_dropped_and_the_new_endpoint_found() -> None:
    async def echo(ids: list[str], min_pos: str | None) -> list:
        return ids

    servers = [ReadServer(echo)]
    await servers[0].start("127.0.0.1")

    async def discover() -> dict | None:
        return servers[-1].endpoint

    channel = DirectChannel(discover, retry_s=0.0)
    assert await channel.connect()
    assert await channel.get_profiles(["a"], None) == ["a"]
    await servers[0].close()  # the shard went away; it comes back elsewhere, new token
    servers.append(ReadServer(echo))
    await servers[1].start("127.0.0.1")
    assert await channel.get_profiles(["b"], None) is None  # EOF: this one goes over Ray
    assert not channel.connected and channel.connecting is not None
    await channel.connecting
    assert await channel.get_profiles(["c"], None) == ["c"]
    assert servers[1].requests == 1
    channel.close()
    await servers[1].close()


async def test_a_read_failing_after_close_does_not_connect_again() -> None:
    release = asyncio.Event()

    async def slow(ids: list[str], min_pos: str | None) -> list:
        await release.wait()
        return ids

    server = ReadServer(slow)
    await server.start("127.0.0.1")
    discovered = []

    async def discover() -> dict | None:
        discovered.append(1)
        return server.endpoint

    channel = DirectChannel(discover, retry_s=0.0)
    assert await channel.connect()
    reading = asyncio.ensure_future(channel.get_profiles(["a"], None))
    while server.requests == 0:  # the request is at the server
        await asyncio.sleep(0)
    channel.close()  # as ShardClient.aclose() does, with that read in flight
    assert await reading is None  # it fails (EOF) and goes over Ray...
    assert channel.connecting is None and not channel.connected  # ...and finds nothing again
    assert discovered == [1] and not await channel.connect()
    release.set()
    await server.close()


async def test_connections_waiting_for_their_token_are_capped() -> None:
    async def echo(ids: list[str], min_pos: str | None) -> list:
        return ids

    server = ReadServer(echo)
    endpoint = await server.start("127.0.0.1")
    idle = []
    try:
        for _ in range(MAX_UNAUTHENTICATED):  # connect and say nothing
            idle.append(await asyncio.open_connection(endpoint["host"], endpoint["port"]))
        while server.status()["connections"] < MAX_UNAUTHENTICATED:
            await asyncio.sleep(0)
        reader, writer = await asyncio.open_connection(endpoint["host"], endpoint["port"])
        assert await reader.read() == b""  # closed at once, without a word
        writer.close()
        assert server.refused == 1
        idle.pop()[1].close()  # one of them leaves: there is room again
        while server.status()["connections"] >= MAX_UNAUTHENTICATED:
            await asyncio.sleep(0)
        conn = await ReadConnection.open(endpoint)
        assert await conn.get_profiles(["a"], None) == ["a"]
        conn.close()
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()


async def test_a_backlog_of_reads_goes_as_several_bounded_calls() -> None:
    calls: list[int] = []

    class Shard:
        async def get_profiles(self, ids: list[str], min_pos: str | None) -> list:
            calls.append(len(ids))
            await asyncio.sleep(0)
            return [{"id": i} for i in ids]

    client = ShardClient([LocalHandle(Shard())])
    wanted = [f"c{i}" for i in range(2 * MAX_BATCH + 7)]
    found = await asyncio.gather(*(client.profile(c) for c in wanted))
    assert [p["id"] for p in found] == wanted
    assert max(calls) <= MAX_BATCH and sum(calls) == len(wanted) and len(calls) >= 3


def test_direct_reads_are_on_by_default_and_can_be_turned_off() -> None:
    assert from_mapping({}, {}).engine.direct_reads is True
    assert from_mapping({"engine": {"direct_reads": False}}, {}).engine.direct_reads is False
    env = {"NUDGE_DIRECT_READS": "false"}
    assert from_mapping({"engine": {"direct_reads": True}}, env).engine.direct_reads is False


# -- a plain shard in this process (real Redis) --------------------------------------------


@pytest.fixture
async def plain_shard(redis_url: str):
    """Shard 0 of SHARDS driven directly, serving its read socket, with one seeded shopper."""
    settings = test_config(shards=SHARDS).engine
    store = Store(connect(redis_url), SHARDS)
    user, anon = on_shard(0, "u")[0], on_shard(0, "a")[0]
    await store.append(history(user, anon))
    await store.close()
    actor = ShardActor(0, SHARDS, settings, redis_url, rules=RULES, serve_reads=True)
    try:
        async with asyncio.timeout(30):
            while not actor.ready:
                await asyncio.sleep(0.01)  # nothing to await on a plain shard's start
        yield actor, user
    finally:
        await actor.stop()


HELLOS = {
    "wrong token": lambda token: encode_frame(
        {"token": token[:-1] + ("0" if token[-1] != "0" else "1")}
    ),
    "no token": lambda token: encode_frame({"ids": ["x"], "min_pos": None}),
    "token of another type": lambda token: encode_frame({"token": 7}),
    "not an object": lambda token: encode_frame([token]),
    # the size cap before the token is small: no waiting for 2 kB that never come
    "too large a hello": lambda token: (2048).to_bytes(4, "big"),
}


@pytest.mark.parametrize("hello", HELLOS.values(), ids=HELLOS.keys())
async def test_a_wrong_token_gets_no_data(plain_shard, hello) -> None:
    actor, user = plain_shard
    endpoint = await actor.read_endpoint()
    request = encode_frame({"ids": [user], "min_pos": None})
    async with raw(endpoint) as (reader, writer):
        writer.write(encode_frame({"token": endpoint["token"]}) + request)
        assert (await answer(reader))[0]["id"] == user  # the right token reads
    async with raw(endpoint) as (reader, writer):
        writer.write(hello(endpoint["token"]) + request)
        assert await closed_silently(reader)


BAD_FRAMES = {
    "over the size cap": (MAX_FRAME + 1).to_bytes(4, "big"),
    "not JSON": b"\x00\x00\x00\x05{ids:",
    "empty": b"\x00\x00\x00\x00",
    "ids not a list": encode_frame({"ids": "u0", "min_pos": None}),
    "min_pos not a string": encode_frame({"ids": ["u0"], "min_pos": 5}),
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_a_bad_frame_closes_the_connection(plain_shard, frame: bytes) -> None:
    actor, user = plain_shard
    endpoint = await actor.read_endpoint()
    async with raw(endpoint) as (reader, writer):
        writer.write(encode_frame({"token": endpoint["token"]}))
        writer.write(encode_frame({"ids": [user], "min_pos": None}))
        assert (await answer(reader))[0]["id"] == user
        writer.write(frame)
        assert await closed_silently(reader)


async def test_stopping_the_shard_closes_its_read_socket(plain_shard) -> None:
    actor, user = plain_shard
    endpoint = await actor.read_endpoint()
    conn = await ReadConnection.open(endpoint)
    assert (await conn.get_profiles([user], None))[0]["id"] == user
    await actor.stop()
    assert await actor.read_endpoint() is None
    with pytest.raises(asyncio.IncompleteReadError):
        await conn.get_profiles([user], None)
    conn.close()
    with pytest.raises(OSError):
        await ReadConnection.open(endpoint)


# -- shards as Ray actors --------------------------------------------------------------------


@pytest.fixture
def ray_shards(ray_cluster, redis_url: str):
    """SHARDS shard actors over the two-node cluster, serving read sockets."""
    config = test_config(shards=SHARDS)
    handles = ensure_shards(config.engine, redis_url, rules=RULES)
    wait_ready(handles)
    yield config.engine, handles
    stop_shards(handles)


def facts(profile: dict) -> dict:
    """What the events made of a profile (RFM and rule state also hold times of evaluation)."""
    keys = ("id", "counts", "cart", "cart_total", "orders", "revenue", "traits", "merged_ids")
    return {k: profile[k] for k in keys}


async def restarted(handle, old_pid: int) -> dict:
    """The status of `handle` once Ray has restarted it in a new process and it is ready."""
    async with asyncio.timeout(60):
        while True:
            status = await handle.status.remote()
            if status["pid"] != old_pid and status["ready"]:
                return status
            await asyncio.sleep(0.05)  # Ray has no event for "restarted and recovered"


@pytest.mark.ray
async def test_reads_go_over_the_channel_and_answer_as_ray_does(ray_shards, redis_url) -> None:
    settings, handles = ray_shards
    store = Store(connect(redis_url), SHARDS)
    users = [on_shard(0, "u")[0], on_shard(1, "u")[0]]
    anons = [on_shard(0, "a")[0], on_shard(1, "a")[0]]
    positions = await store.append(history(users[0], anons[0]) + history(users[1], anons[1]))
    await store.close()
    direct = shard_client(settings)
    over_ray = shard_client(dataclasses.replace(settings, direct_reads=False))
    assert await direct.connect_direct() == SHARDS
    unknown = [on_shard(0, "n")[0], on_shard(1, "n")[0]]
    for index in range(SHARDS):
        # known, merged into another id (answered as that id), unknown
        ids = [users[index], anons[index], unknown[index]]
        by_ray = await handles[index].get_profiles.remote(ids, positions[index])
        assert isinstance(by_ray[0], dict) and by_ray[1:] == [users[index], None]
        assert await direct.direct[index].get_profiles(ids, positions[index]) == by_ray
    for customer in [*users, *anons, *unknown]:
        mine = await direct.profile(customer, min_pos=positions)
        assert mine == await over_ray.profile(customer, min_pos=positions)
        assert (mine is None) == (customer in unknown)
    assert direct.stats["direct_calls"] == direct.stats["profile_calls"] > 0
    assert direct.stats["ray_calls"] == 0
    assert over_ray.stats["ray_calls"] == over_ray.stats["profile_calls"] > 0
    assert over_ray.stats["direct_calls"] == 0
    served = [s["direct_reads"]["requests"] for s in ray.get([h.status.remote() for h in handles])]
    assert sum(served) == direct.stats["direct_calls"] + SHARDS  # and the two raw reads above


@pytest.mark.ray
async def test_a_wrong_token_gets_no_data_from_a_ray_shard(ray_shards) -> None:
    _settings, handles = ray_shards
    endpoint = await handles[0].read_endpoint.remote()
    assert endpoint["host"] == ray.util.get_node_ip_address()  # reachable from other nodes
    request = encode_frame({"ids": ["x"], "min_pos": None})
    async with raw(endpoint) as (reader, writer):
        writer.write(encode_frame({"token": endpoint["token"]}) + request)
        assert await answer(reader) == [None]
    async with raw(endpoint) as (reader, writer):
        writer.write(encode_frame({"token": "0" * 32}) + request)
        assert await closed_silently(reader)


@pytest.mark.ray
async def test_reads_go_on_through_a_kill_9_and_restart_of_the_shard(ray_shards, redis_url) -> None:
    _settings, handles = ray_shards
    store = Store(connect(redis_url), SHARDS)
    user, anon = on_shard(0, "u")[0], on_shard(0, "a")[0]
    positions = await store.append(history(user, anon))
    await store.close()
    # retry_s=0: rediscovery right after the failed read, whenever the restart finished
    client = ShardClient(handles, direct_reads=True, retry_s=0.0)
    assert await client.connect_direct() == SHARDS
    before = facts(await client.profile(user, min_pos=positions))
    assert before["cart_total"] == 3.0 and client.stats["direct_calls"] == 1
    old = await handles[0].status.remote()
    os.kill(old["pid"], signal.SIGKILL)
    await restarted(handles[0], old["pid"])
    channel = client.direct[0]
    tries = channel.discoveries
    assert facts(await client.profile(user, min_pos=positions)) == before
    assert client.stats["ray_calls"] == 1  # the old connection failed: this read went over Ray
    assert channel.discoveries == tries + 1  # ...and set off finding the new endpoint
    if channel.connecting is not None:  # (it may be done already, while Ray answered)
        await channel.connecting
    assert channel.connected
    assert facts(await client.profile(user, min_pos=positions)) == before
    assert client.stats["direct_calls"] == 2 and client.stats["ray_calls"] == 1
    await client.aclose()


@pytest.mark.ray
async def test_read_your_writes_over_the_channel(ray_shards, redis_url) -> None:
    settings, _handles = ray_shards
    store = Store(connect(redis_url), SHARDS)
    user = on_shard(0, "u")[0]
    client = shard_client(settings)
    assert await client.connect_direct() == SHARDS
    written = 0
    for _ in range(3):
        # Many stream entries at once: the shard applies them over several slices,
        # and a read that did not wait for min_pos would answer in between.
        for _ in range(20):
            batch = [normalized(track(user, "Product Viewed")) for _ in range(200)]
            positions = await store.append(batch)
            written += len(batch)
        profile = await client.profile(user, min_pos=positions)
        assert profile["counts"]["Product Viewed"] == written
    assert client.stats["direct_calls"] == 3 and client.stats["ray_calls"] == 0
    await store.close()
    await client.aclose()


@pytest.mark.ray
async def test_with_direct_reads_off_every_read_is_a_ray_call(ray_cluster, redis_url) -> None:
    settings = test_config(shards=1, direct_reads=False).engine
    handles = ensure_shards(settings, redis_url)
    try:
        wait_ready(handles)
        assert await handles[0].read_endpoint.remote() is None
        assert (await handles[0].status.remote())["direct_reads"] is None  # no socket open
        store = Store(connect(redis_url), 1)
        positions = await store.append([normalized(track("off", "Product Viewed"))])
        await store.close()
        client = shard_client(settings)
        assert client.direct == [None]
        assert await client.connect_direct() == 0
        profile = await client.profile("off", min_pos=positions)
        assert profile["counts"] == {"Product Viewed": 1}
        assert client.stats["ray_calls"] == 1 and client.stats["direct_calls"] == 0
    finally:
        stop_shards(handles)

from __future__ import annotations

import orjson
import pytest
import redis

from engine import store as store_module
from engine.partition import Changes
from engine.routing import shard_for, stream_key
from engine.store import (
    CONSENT_MARK_TTL_S,
    Store,
    connect,
    consent_key,
    consent_marks,
    parse_id,
)
from tests.factories import normalized, track
from tests.faults import transactions_fail

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def store(redis_url: str):
    store = Store(connect(redis_url), 4)
    yield store
    await store.close()


async def test_append_writes_one_entry_per_shard(store: Store, sync_redis: redis.Redis) -> None:
    events = [normalized(track(f"user-{i}")) for i in range(40)]
    written = await store.append(events)
    per_shard = {shard_for(e["customer"], 4) for e in events}
    assert set(written) == per_shard
    stored = 0
    for index in per_shard:
        entries = sync_redis.xrange(stream_key(index))
        assert len(entries) == 1  # one XADD per (request, shard), never one per event
        batch = orjson.loads(entries[0][1][b"e"])
        assert all(shard_for(e["customer"], 4) == index for e in batch)
        stored += len(batch)
    assert stored == 40


async def test_consent_changes_are_noted_with_the_events(
    store: Store, sync_redis: redis.Redis
) -> None:
    unsub = normalized(track("cy", "Unsubscribed"))
    views = [normalized(track(f"user-{i}")) for i in range(5)]
    ident = {"type": "identify", "userId": "di"}
    back = normalized({**ident, "messageId": "m-in", "traits": {"email_opt_in": True}})
    out = normalized({**ident, "messageId": "m-out", "traits": {"email_opt_in": False}})
    await store.append([*views, unsub, back, out])
    assert sync_redis.get(consent_key(shard_for("cy", 4), "cy")) == b"unsubscribed"
    assert sync_redis.get(consent_key(shard_for("di", 4), "di")) == b"unsubscribed"  # the last
    assert 0 < sync_redis.ttl(consent_key(shard_for("cy", 4), "cy")) <= CONSENT_MARK_TTL_S
    notes = sync_redis.keys("nudge:*:consent:*")
    assert len(notes) == 2  # cy and di: a view changes nothing
    assert not [k for k in notes if b"cy" in k or b"di" in k]  # ids by digest, as erasures
    await store.append([back])
    assert sync_redis.get(consent_key(shard_for("di", 4), "di")) == b"resubscribed"


async def test_the_last_opt_in_is_noted_by_its_id_the_same_for_every_copy(store: Store) -> None:
    # An unsubscribe after an opt-in is told apart by it (engine.tracking). A count
    # of opt-ins went up again for an SDK's retry or a forward delivered twice, and
    # a repeated unsubscribe click then counted twice.
    ident = {"type": "identify", "userId": "ed", "traits": {"email_opt_in": True}}
    first = normalized({**ident, "messageId": "optin-1"})
    assert await store.latest_optin("ed") is None
    await store.append([first])
    await store.append([dict(first)])  # the SDK's retry
    # and forwarded on to its owner twice, as deliver_forwards writes it
    for _ in range(2):
        await store.append_groups({0: [first]}, consent_marks([("ed", first)]))
    assert await store.latest_optin("ed") == "optin-1"
    await store.append([normalized({**ident, "messageId": "optin-2"})])
    assert await store.latest_optin("ed") == "optin-2"


async def test_checkpoint_round_trip_and_trim(store: Store, sync_redis: redis.Redis) -> None:
    ids = []
    for _ in range(3):
        ids.append((await store.append_groups({0: [normalized(track("a"))]}))[0])
    changes = Changes(profiles={"a": b'{"x":1}'}, aliases={"anon": "a"}, erased=["d1"])
    await store.save_checkpoint(0, changes, ids[1])
    pos, profiles, aliases, erased = await store.load_checkpoint(0)
    assert pos == ids[1]
    assert profiles == {b"a": b'{"x":1}'}
    assert aliases == {b"anon": b"a"}
    assert erased == {b"d1"}
    # Trimming (approximate, by whole stream nodes) never drops what replay needs.
    remaining = [sid.decode() for sid, _ in sync_redis.xrange(stream_key(0))]
    assert remaining[-2:] == ids[1:]
    await store.save_checkpoint(0, Changes(deleted=["a"], unaliased=["anon"]), ids[2])
    _, profiles, aliases, _ = await store.load_checkpoint(0)
    assert profiles == {} and aliases == {}


async def test_a_checkpoint_that_fails_leaves_nothing_of_itself(
    store: Store, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # All of a checkpoint becomes visible at once or none of it: profiles written
    # ahead of their aliases, deletions or position once lost identity merges and
    # applied events twice after a crash (b0510a7, reverted).
    await store.save_checkpoint(0, Changes(profiles={"a": b'{"x":1}'}), "1-0")
    event = {"type": "_merge_out", "customer": "anon-7", "userId": "u", "ts": 1.0}
    changes = Changes(
        profiles={"a": b'{"x":2}', "b": b'{"x":3}'},
        deleted=["gone"],
        aliases={"anon-7": "u"},
        forwards=[("anon-7", event)],
    )
    with transactions_fail(store.redis), pytest.raises(redis.exceptions.ConnectionError):
        await store.save_checkpoint(0, changes, "5-0")
    pos, profiles, aliases, _ = await store.load_checkpoint(0)
    assert (pos, profiles, aliases) == ("1-0", {b"a": b'{"x":1}'}, {})
    assert sync_redis.xrange("nudge:{s0}:fwd") == []


async def test_a_commit_whose_fold_never_ran_is_what_recovery_reads(
    store: Store, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Profiles go to a staging key in short HSETs, the commit RENAMEs it to the stage,
    # and the fold copies the stage into the profiles hash. A crash before the fold
    # leaves the stage: recovery reads it over the hash, and the next checkpoint folds
    # it before its own commit, so a deletion there is not undone.
    monkeypatch.setattr(store_module, "_CHUNK_BYTES", 100)
    await store.save_checkpoint(0, Changes(profiles={"a": b'{"x":1}', "b": b'{"x":1}'}), "1-0")
    calls = sync_redis.info("commandstats")["cmdstat_hset"]["calls"]
    real_fold = store._fold

    async def refused(index: int, chunks: list) -> None:
        raise redis.exceptions.ResponseError("OOM command not allowed")

    monkeypatch.setattr(store, "_fold", refused)
    blobs = {f"c{i}": b'{"pad":"' + b"x" * 50 + b'"}' for i in range(5)}
    # Committed: a fold that fails is left to the next checkpoint, not raised (raised,
    # the shard would write again, as new, a checkpoint that is already in).
    await store.save_checkpoint(0, Changes(profiles={**blobs, "a": b'{"x":2}'}), "5-0")
    assert sync_redis.info("commandstats")["cmdstat_hset"]["calls"] - calls == 3  # staged
    assert sync_redis.hget("nudge:{s0}:profiles", "a") == b'{"x":1}'  # not folded yet
    info = await store.info(0)
    assert (info["checkpointed_profiles"], info["unfolded_profiles"]) == (2, 6)
    pos, profiles, _, _ = await store.load_checkpoint(0)
    assert pos == "5-0"
    staged = {k.encode(): v for k, v in blobs.items()}
    assert profiles == {b"a": b'{"x":2}', b"b": b'{"x":1}', **staged}

    monkeypatch.setattr(store, "_fold", real_fold)
    sync_redis.hset("nudge:{s0}:staging", "stray", b"{}")  # from an attempt that failed
    await store.save_checkpoint(0, Changes(deleted=["c0", "b"]), "6-0")
    assert not sync_redis.exists("nudge:{s0}:stage")
    pos, profiles, _, _ = await store.load_checkpoint(0)
    assert pos == "6-0" and sorted(profiles) == [b"a", b"c1", b"c2", b"c3", b"c4"]
    assert profiles[b"a"] == b'{"x":2}'
    await store.save_checkpoint(0, Changes(profiles={"d": b"{}"}), "7-0")
    _, profiles, _, _ = await store.load_checkpoint(0)
    assert b"stray" not in profiles and b"d" in profiles  # staging starts empty
    assert sorted(sync_redis.hkeys("nudge:{s0}:profiles")) == sorted(profiles)  # folded in


async def test_a_checkpoint_is_read_back_in_pages(
    store: Store, sync_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One HGETALL of a big shard would have Redis build gigabytes of reply at once.
    monkeypatch.setattr(store_module, "_SCAN", 100)
    # Over 512 fields: smaller hashes are packed, and HSCAN answers them in one page.
    blobs = {f"c{i}": b'{"n":%d}' % i for i in range(1000)}
    aliases = {f"anon-{i}": f"c{i}" for i in range(600)}
    erased = [f"digest-{i}" for i in range(600)]
    await store.save_checkpoint(0, Changes(profiles=blobs, aliases=aliases, erased=erased), "3-0")
    sync_redis.hset("nudge:{s0}:stage", mapping={"c7": b'{"n":-7}', "new": b"{}"})  # unfolded
    before = sync_redis.info("commandstats")
    pos, profiles, got_aliases, got_erased = await store.load_checkpoint(0)
    after = sync_redis.info("commandstats")
    assert pos == "3-0"
    assert profiles == {
        **{k.encode(): v for k, v in blobs.items()},
        b"c7": b'{"n":-7}',  # the stage over the hash
        b"new": b"{}",
    }
    assert got_aliases == {k.encode(): v.encode() for k, v in aliases.items()}
    assert got_erased == {e.encode() for e in erased}
    assert "cmdstat_hgetall" not in after or after["cmdstat_hgetall"] == before.get(
        "cmdstat_hgetall"
    )
    hscans = after["cmdstat_hscan"]["calls"] - before.get("cmdstat_hscan", {"calls": 0})["calls"]
    assert hscans >= 10  # about 1,000 / 100 + 600 / 100 pages, not one reply per hash


async def test_checkpoint_chunks_are_about_the_limit_and_never_empty() -> None:
    blobs = {"a": b"x" * 70, "b": b"x" * 70, "c": b"x" * 300, "d": b"x" * 10}
    assert [list(c) for c in store_module._chunks(blobs, 100)] == [["a", "b"], ["c"], ["d"]]
    assert store_module._chunks({}, 100) == []


async def test_forwards_are_delivered_to_owning_streams(
    store: Store, sync_redis: redis.Redis
) -> None:
    event = {"type": "_merge_out", "customer": "anon-7", "userId": "u", "ts": 1.0}
    await store.save_checkpoint(0, Changes(forwards=[("anon-7", event)]), "0-1")
    assert await store.deliver_forwards(0) == 1
    target = stream_key(shard_for("anon-7", 4))
    [(_, fields)] = sync_redis.xrange(target)
    assert orjson.loads(fields[b"e"]) == [event]
    assert await store.deliver_forwards(0) == 0  # delivered once, then removed


async def test_tail_and_parse_id(store: Store) -> None:
    assert await store.tail(2) == "0-0"
    written = await store.append_groups({2: [normalized(track("x"))]})
    assert await store.tail(2) == written[2]
    assert parse_id("12-3") < parse_id("12-10") < parse_id("13-0")


async def test_a_fold_refused_for_memory_keeps_the_stage(
    store: Store, sync_redis: redis.Redis
) -> None:
    # Out of memory, Redis refuses the HSETs but would still run an UNLINK sent with
    # them: the committed stage must outlive a fold that did not land.
    await store.save_checkpoint(0, Changes(profiles={"a": b'{"v":1}'}), "1-0")
    sync_redis.hset("nudge:{s0}:stage", "a", b'{"v":2}')  # committed, not yet folded
    used = sync_redis.info("memory")["used_memory"]
    sync_redis.config_set("maxmemory", used)
    try:
        with pytest.raises(redis.exceptions.ResponseError):
            await store._fold(0, [{"a": b'{"v":2}' + b" " * 100_000}])
    finally:
        sync_redis.config_set("maxmemory", 0)
    _, profiles, _, _ = await store.load_checkpoint(0)
    assert profiles == {b"a": b'{"v":2}'}  # the stage is still there, over the hash

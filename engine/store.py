"""Everything Nudge keeps in Redis, behind one class.

Per shard N, all under the hash tag {sN} so a Redis Cluster keeps them together:
  nudge:{sN}:events    stream; one entry per (request, shard), field e = JSON list of events
  nudge:{sN}:profiles  hash customer id -> encoded profile (checkpoint), overlaid by:
  nudge:{sN}:stage     hash the last committed checkpoint's profiles until folded in
  nudge:{sN}:staging   hash a checkpoint's profiles being written (never read)
  nudge:{sN}:aliases   hash old id -> id it was merged into (checkpoint)
  nudge:{sN}:erased    set of digests of erased ids (checkpoint)
  nudge:{sN}:pos       last stream id the checkpoint includes
  nudge:{sN}:fwd       stream of messages for other shards, written with the checkpoint
  nudge:{sN}:outbox    stream of decided sends, field s = JSON send; written as soon as
                       they are decided (not with the checkpoint)
  nudge:{sN}:sent:ID   marks send ID as written to the outbox, for a day. After a crash,
                       replay decides a send again under the same deterministic send_id;
                       this mark keeps it out of the outbox the second time.
  nudge:{sN}:consent:D the latest consent change of the customer whose id has digest D
                       (engine.partition.erased_key), as stored, before any shard applied
                       it ("unsubscribed", "resubscribed" or "erased"), for an hour:
                       dispatchers check it before every attempt (promise 6).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engine.errors import StoreError
from engine.partition import Changes, erased_key
from engine.profile import RESUBSCRIBES, consent_change
from engine.routing import shard_for, shard_tag, stream_key

log = logging.getLogger(__name__)

# Encoded profiles per HSET, at most: each command holds Redis for the time it takes
# (about 2 ms per MB here); the checkpoint's transaction carries no profile.
_CHUNK_BYTES = 256 * 1024
# Fields per HSCAN page when a checkpoint is read back: about 3 MB of profiles.
_SCAN = 1000


def parse_id(stream_id: str | bytes) -> tuple[int, int]:
    """A stream id as a comparable (milliseconds, sequence) pair."""
    if isinstance(stream_id, bytes):
        stream_id = stream_id.decode()
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _key(index: int, name: str) -> str:
    return f"nudge:{shard_tag(index)}:{name}"


def sent_key(index: int, send_id: str) -> str:
    """The mark that send `send_id` of shard `index` is in its outbox already."""
    return _key(index, f"sent:{send_id}")


# Replays after a crash are seconds to minutes of events: a day of marks covers them.
_SENT_TTL_S = 86_400
# KEYS: the outbox, then one mark per send; ARGV: the marks' TTL, then each send's JSON.
_APPEND_SENDS = """
local n = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], '*', 's', ARGV[i])
    n = n + 1
  end
end
return n
"""


def consent_key(index: int, customer: str) -> str:
    """Where the latest consent change of `customer` (of shard `index`) is noted."""
    # By digest, as erasures are kept: the note outlives an erasure by up to an hour.
    return _key(index, f"consent:{erased_key(customer)}")


def optin_key(index: int, customer: str) -> str:
    """Which opt-in of `customer` was the last within the hour (consent_key's TTL)."""
    return _key(index, f"optin:{erased_key(customer)}")


# Covers a send decided before the change and delivered after it: the profile copy
# a send carries (a fraction of a second), a shard behind its stream, a replay
# after a crash. Past it the shard has applied the change and the live read sees it.
CONSENT_MARK_TTL_S = 3600
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")


def consent_marks(targets: Iterable[tuple[str, dict]]) -> dict[str, tuple[str, str]]:
    """Each customer's consent change and its event's messageId (the last one wins),
    from (customer, event) pairs."""
    marks: dict[str, tuple[str, str]] = {}
    for customer, event in targets:
        change = consent_change(event)
        if change is not None:
            marks[customer] = (change, event["messageId"])
    return marks


def outbox_key(index: int) -> str:
    """The stream of sends decided by shard `index`."""
    return _key(index, "outbox")


def shown_url(url: str) -> str:
    """`url` fit to print or log: a password in it, or in ?password=, becomes ***.

    By hand, not urlsplit: the URLs worth masking are often the ones it refuses
    (no scheme, an unencoded / or # in the password, a broken IPv6 address).
    """
    shown = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = shown.partition("://")
    if not sep:
        scheme, rest = "", shown
    if "@" not in rest:
        return shown
    userinfo, host = rest.rsplit("@", 1)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}@{host}"


def connect(url: str, *, socket_timeout: float | None = 10) -> aioredis.Redis:
    """An asyncio Redis client for `url` (redis:// or unix://).

    `socket_timeout` bounds every command's write and reply. None leaves that to
    the caller, for a client whose every call runs under a timeout of its own:
    redis-py then skips a timeout per reply and a task per write. Connecting and
    closing stay bounded (10 s) either way.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=socket_timeout,
        socket_connect_timeout=10,
    )


def _chunks(profiles: dict, limit: int) -> list[dict]:
    """`profiles` in mappings of about `limit` encoded bytes (at least one profile each)."""
    out: list[dict] = []
    chunk: dict = {}
    size = 0
    for cid, blob in profiles.items():
        chunk[cid] = blob
        size += len(blob)
        if size >= limit:
            out.append(chunk)
            chunk, size = {}, 0
    if chunk:
        out.append(chunk)
    return out


def decode_entries(raw: list) -> list[tuple[str, list]]:
    """(stream id, events) of each raw entry `Store.read` returned."""
    return [(sid.decode(), orjson.loads(fields[b"e"])) for sid, fields in raw]


class Store:
    """Streams and checkpoints of all shards in one Redis."""

    def __init__(self, client: aioredis.Redis, shards: int):
        self.redis = client
        self.shards = shards

    async def close(self) -> None:
        """Release the connection pool."""
        await self.redis.aclose()

    async def ping(self) -> bool:
        """True if Redis answers."""
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    # -- ingest -------------------------------------------------------------
    async def append(self, events: list[dict]) -> dict[int, str]:
        """Make `events` durable: one XADD per shard they touch, all or nothing.

        Returns the stream id written per shard.
        """
        groups: dict[int, list[dict]] = defaultdict(list)
        shards = self.shards
        for event in events:
            groups[shard_for(event["customer"], shards)].append(event)
        marks = consent_marks((event["customer"], event) for event in events)
        return await self.append_groups(groups, marks)

    async def append_groups(
        self, groups: dict[int, list[dict]], marks: dict[str, tuple[str, str]] | None = None
    ) -> dict[int, str]:
        """XADD each shard's events as one entry and note consent `marks`, all or nothing."""
        order = list(groups)
        try:
            async with self.redis.pipeline(transaction=len(groups) > 1 or bool(marks)) as pipe:
                for index in order:
                    pipe.xadd(stream_key(index), {"e": orjson.dumps(groups[index])})
                for customer, (change, message_id) in (marks or {}).items():
                    index = shard_for(customer, self.shards)
                    pipe.set(consent_key(index, customer), change, ex=CONSENT_MARK_TTL_S)
                    if change == RESUBSCRIBES:
                        # An unsubscribe after it must count even within the same
                        # minute (engine.tracking), told apart by this opt-in's id: the
                        # same again for a retried or re-forwarded copy of the event.
                        key = optin_key(index, customer)
                        pipe.set(key, message_id, ex=CONSENT_MARK_TTL_S)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"could not store events: {exc}") from exc
        ids = replies[: len(order)]  # the marks' replies follow
        return {index: sid.decode() for index, sid in zip(order, ids, strict=True)}

    async def latest_optin(self, customer: str) -> str | None:
        """The messageId of `customer`'s last opt-in within the hour (see append_groups)."""
        key = optin_key(shard_for(customer, self.shards), customer)
        try:
            found = await self.redis.get(key)
        except (RedisError, OSError) as exc:
            raise StoreError(f"could not read a consent note: {exc}") from exc
        return found.decode() if found is not None else None

    async def tail(self, index: int) -> str:
        """The newest id in shard `index`'s stream, or 0-0 when it is empty."""
        try:
            last = await self.redis.xrevrange(stream_key(index), count=1)
        except (RedisError, OSError) as exc:
            raise StoreError(f"could not read stream tail: {exc}") from exc
        return last[0][0].decode() if last else "0-0"

    async def tails(self) -> dict[int, str]:
        """The newest id of every shard's stream, in one round trip."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for index in range(self.shards):
                    pipe.xrevrange(stream_key(index), count=1)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"could not read stream tails: {exc}") from exc
        return {i: (last[0][0].decode() if last else "0-0") for i, last in enumerate(replies)}

    # -- shard side -----------------------------------------------------------
    async def read(self, index: int, after: str, *, count: int, block_ms: int) -> list:
        """Up to `count` raw stream entries after `after`, waiting up to `block_ms` for one.

        `decode_entries` turns them into events; apart, so a shard can count the
        CPU each takes.
        """
        reply = await self.redis.xread({stream_key(index): after}, count=count, block=block_ms)
        return reply[0][1] if reply else []

    async def load_checkpoint(self, index: int) -> tuple[str, dict, dict, set]:
        """(position, profiles, aliases, erased) as last checkpointed; empty if none.

        Read a page at a time (HSCAN, SSCAN), never as one reply: a shard of a
        million profiles is gigabytes, which one HGETALL would have Redis hold in
        its output buffer, and block on, all at once. The pages agree with the
        position because a shard's keys have one writer, the shard, which is not
        running while it recovers; a reader beside a running shard (training) gets
        each profile as of some recent checkpoint.
        """
        pos = await self.redis.get(_key(index, "pos"))
        profiles = await self._scan_hash(_key(index, "profiles"))
        # Committed, not yet folded in (see save_checkpoint): over the hash, read after it.
        profiles.update(await self._scan_hash(_key(index, "stage")))
        aliases = await self._scan_hash(_key(index, "aliases"))
        erased = {m async for m in self.redis.sscan_iter(_key(index, "erased"), count=_SCAN)}
        return (pos.decode() if pos else "0-0"), profiles, aliases, erased

    async def _scan_hash(self, key: str) -> dict:
        return {field: value async for field, value in self.redis.hscan_iter(key, count=_SCAN)}

    async def save_checkpoint(self, index: int, changes: Changes, pos: str) -> None:
        """Write a checkpoint; all of it becomes visible at once, in one short MULTI/EXEC.

        What recovery reads is the profiles hash overlaid with the committed stage
        (`load_checkpoint`). The changed profiles go first to a staging key in short
        HSETs, which nothing reads; one MULTI/EXEC then RENAMEs it to the stage (O(1))
        with the position, aliases, deletions, erasures and forwards; last, the stage
        is folded into the profiles hash in short HSETs and UNLINKed, which leaves
        what recovery reads unchanged at every step. So Redis is never held for the
        whole checkpoint, and a crash anywhere leaves the last committed one.

        `changes.sends` are not written here: the caller appends them first
        (`append_sends`), so no checkpoint covers an event whose send is not out.
        """
        staging, stage = _key(index, "staging"), _key(index, "stage")
        main = _key(index, "profiles")
        await self._fold_leftover_stage(index)  # a fold cut short: the stage must be empty
        # A deleted id is never among the changed profiles (Partition keeps them apart),
        # so the fold cannot bring back what the commit deletes.
        chunks = _chunks(changes.profiles, _CHUNK_BYTES)
        if chunks:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.unlink(staging)  # left by an attempt that failed before its commit
                for chunk in chunks:
                    pipe.hset(staging, mapping=chunk)
                await pipe.execute()
        async with self.redis.pipeline(transaction=True) as pipe:
            if chunks:
                pipe.rename(staging, stage)
            if changes.deleted:
                pipe.hdel(main, *changes.deleted)
            if changes.aliases:
                pipe.hset(_key(index, "aliases"), mapping=changes.aliases)
            if changes.unaliased:
                pipe.hdel(_key(index, "aliases"), *changes.unaliased)
            if changes.erased:
                pipe.sadd(_key(index, "erased"), *changes.erased)
            if changes.forwards:
                pipe.xadd(_key(index, "fwd"), {"f": orjson.dumps(changes.forwards)})
            pipe.set(_key(index, "pos"), pos)
            # Entries at or below the checkpoint are applied and no longer needed.
            # Approximate trimming only drops whole stream nodes below MINID: much
            # cheaper than exact, and it never removes an entry at or above it.
            pipe.xtrim(stream_key(index), minid=pos, approximate=True)
            await pipe.execute()
        if chunks:
            try:
                await self._fold(index, chunks)
            except (RedisError, OSError) as exc:
                # Committed all the same: the stage stays, recovery reads it, and the
                # next checkpoint folds it first. Raising would have the caller write
                # again a checkpoint that is already in.
                log.warning("shard %d: checkpoint committed, fold deferred: %s", index, exc)

    async def _fold(self, index: int, chunks: list[dict]) -> None:
        """Copy the committed stage (`chunks`, its content) into the profiles hash; drop it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.hset(_key(index, "profiles"), mapping=chunk)
            await pipe.execute()
        # Only once every HSET is in: a refused one (out of memory) raises above, and
        # the stage must then stay.
        await self.redis.unlink(_key(index, "stage"))

    async def _fold_leftover_stage(self, index: int) -> None:
        # Only after a crash or a Redis error between a commit and its fold.
        if not await self.redis.exists(_key(index, "stage")):
            return
        staged = await self._scan_hash(_key(index, "stage"))
        await self._fold(index, _chunks(staged, _CHUNK_BYTES))

    async def append_sends(self, index: int, sends: list[dict]) -> int:
        """Append decided sends to shard `index`'s outbox, in order, in one round trip.

        A send whose id was already written (the replay after a crash decides it
        again) is left out; returns how many were appended.
        """
        if not sends:
            return 0
        keys = [outbox_key(index), *(sent_key(index, send["send_id"]) for send in sends)]
        args = [_SENT_TTL_S, *(orjson.dumps(send) for send in sends)]
        return int(await self.redis.eval(_APPEND_SENDS, len(keys), *keys, *args))

    async def deliver_forwards(self, index: int) -> int:
        """Append pending forwards to their owners' streams; returns how many went out.

        At least once: a crash between the XADDs and the XDEL re-sends, which
        the receiving partitions ignore (merges and forwarded events are idempotent).
        """
        entries = await self.redis.xrange(_key(index, "fwd"))
        if not entries:
            return 0
        groups: dict[int, list[dict]] = defaultdict(list)
        targets: list[tuple[str, dict]] = []
        for _, fields in entries:
            for target, event in orjson.loads(fields[b"f"]):
                groups[shard_for(target, self.shards)].append(event)
                targets.append((target, event))
        await self.append_groups(groups, consent_marks(targets))
        await self.redis.xdel(_key(index, "fwd"), *[sid for sid, _ in entries])
        return sum(len(group) for group in groups.values())

    async def outbox(
        self, index: int, *, after: str = "-", count: int = 1000
    ) -> list[tuple[str, dict]]:
        """Sends in shard `index`'s outbox after stream id `after` (exclusive unless "-")."""
        start = after if after == "-" else f"({after}"
        entries = await self.redis.xrange(outbox_key(index), min=start, count=count)
        return [(sid.decode(), orjson.loads(fields[b"s"])) for sid, fields in entries]

    async def info(self, index: int) -> dict[str, Any]:
        """Stream length, checkpoint position and checkpointed profiles of one shard.

        `unfolded_profiles` counts a committed stage not yet folded into the profiles
        hash (for a moment after each checkpoint, or after a crash until the next);
        some of them may be among `checkpointed_profiles` in an older version.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream_key(index))
            pipe.get(_key(index, "pos"))
            pipe.hlen(_key(index, "profiles"))
            pipe.hlen(_key(index, "stage"))
            length, pos, profiles, unfolded = await pipe.execute()
        return {
            "stream_length": length,
            "checkpoint_pos": (pos or b"0-0").decode(),
            "checkpointed_profiles": profiles,
            "unfolded_profiles": unfolded,
        }

"""Everything delivery keeps in Redis, behind one class.

Per shard N, under the shard's hash tag {sN} (so each transaction below stays
on one Redis Cluster slot):
  nudge:{sN}:outbox           the shard's sends; consumer group "dispatch" reads it
  nudge:{sN}:d:<send_id>      the send's delivery record (JSON: state, attempts, detail),
                              kept `ledger_days`; a final state means "never again"
  nudge:{sN}:dlq              dead-letter stream: field d = JSON {send, error, attempts, ...}
  nudge:{sN}:dcounts          outcome counters, field "rule\\x1fvariant\\x1foutcome"

An outcome is recorded, counted, acknowledged and deleted from the outbox in
one MULTI/EXEC, so a crash leaves either nothing done (the entry is replayed)
or everything done.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from engine.coerce import whole_number
from engine.errors import NotFound, StoreError
from engine.routing import shard_tag
from engine.store import consent_key, outbox_key

GROUP = "dispatch"
SENDING, SENT, SUPPRESSED, HOLDOUT, DEAD = "sending", "sent", "suppressed", "holdout", "dead"
FINAL = frozenset({SENT, SUPPRESSED, HOLDOUT, DEAD})
# Counter outcomes: the final states, plus "failed" per failed attempt and "replayed".
FAILED, DEAD_LETTERED, REPLAYED = "failed", "dead_lettered", "replayed"


# Replay a dead letter only if this call is the one that removes it.
_REPLAY = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('DEL', KEYS[3])
local entry = redis.call('XADD', KEYS[2], '*', 's', ARGV[2])
redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
return entry
"""
# XCLAIM (idle time back to 0) each id still pending under this consumer, no other.
_TOUCH = """
local touched = 0
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #held > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""


def record_key(index: int, send_id: str) -> str:
    """The delivery record of one send."""
    return f"nudge:{shard_tag(index)}:d:{send_id}"


def dlq_key(index: int) -> str:
    """Shard `index`'s dead-letter stream."""
    return f"nudge:{shard_tag(index)}:dlq"


def counts_key(index: int) -> str:
    """Shard `index`'s outcome counters."""
    return f"nudge:{shard_tag(index)}:dcounts"


def _field(send: dict, outcome: str) -> str:
    return "\x1f".join((send.get("rule") or "", send.get("variant") or "", outcome))


Entry = tuple[int, str, dict]  # (shard index, outbox stream id, send)


class Ledger:
    """Outbox consumption, delivery records, counters and dead letters of all shards."""

    def __init__(self, client: aioredis.Redis, shards: int, *, ttl_s: float = 30 * 86400.0):
        self.redis = client
        self.shards = shards
        self.ttl_s = int(ttl_s)
        self._keys = [outbox_key(i) for i in range(shards)]
        self._index = {key.encode(): i for i, key in enumerate(self._keys)}

    async def close(self) -> None:
        """Release the connection pool."""
        await self.redis.aclose()

    # -- the outbox ---------------------------------------------------------------
    async def ensure_groups(self) -> None:
        """Create the consumer group on every outbox (from its start: nothing is skipped)."""
        for key in self._keys:
            try:
                await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(
        self,
        consumer: str,
        *,
        count: int,
        block_ms: int | None,
        after: dict[int, str] | None = None,
    ) -> list[Entry]:
        """New entries for `consumer`; with `after`, its own pending entries after those ids."""
        streams = {
            key: (after.get(i, "0") if after is not None else ">")
            for i, key in enumerate(self._keys)
        }
        reply = await self.redis.xreadgroup(
            GROUP, consumer, streams, count=count, block=None if after is not None else block_ms
        )
        return self._entries(reply)

    def _entries(self, reply: Any) -> list[Entry]:
        out: list[Entry] = []
        for key, entries in reply or []:
            index = self._index[key if isinstance(key, bytes) else key.encode()]
            for sid, fields in entries:
                if not fields:  # deleted while pending
                    continue
                out.append((index, sid.decode(), orjson.loads(fields[b"s"])))
        return out

    async def claim(self, consumer: str, *, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries others (crashed, or removed) have held over `min_idle_ms`."""
        out: list[Entry] = []
        for key in self._keys:
            reply = await self.redis.xautoclaim(
                key, GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
            )
            entries = reply[1] if reply else []
            out.extend(self._entries([(key.encode(), entries)]))
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:  # deleted from the stream while pending: nothing to send
                await self.redis.xack(key, GROUP, *deleted)
        return out

    async def pending(self) -> int:
        """Entries read by some dispatcher and not yet finished, over all shards."""
        total = 0
        for key in self._keys:
            try:
                info = await self.redis.xpending(key, GROUP)
            except ResponseError:
                continue
            total += info["pending"] if isinstance(info, dict) else info[0]
        return total

    async def backlog(self) -> int:
        """Entries in the outboxes (pending or not yet read)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self._keys:
                pipe.xlen(key)
            return sum(await pipe.execute())

    # -- records ------------------------------------------------------------------
    async def record_and_consent(
        self, index: int, send_id: str, customer: str
    ) -> tuple[dict | None, str | None]:
        """A send's delivery record and its customer's latest noted consent change, in one read."""
        raw, change = await self.redis.mget(
            record_key(index, send_id), consent_key(index, customer)
        )
        return (orjson.loads(raw) if raw else None), (change.decode() if change else None)

    async def consent(self, index: int, customer: str) -> str | None:
        """The latest consent change noted for `customer` (engine.store), or None."""
        change = await self.redis.get(consent_key(index, customer))
        return change.decode() if change else None

    async def mark_sending(self, index: int, send: dict, attempts: int, now: float) -> None:
        """Record that attempt `attempts` is about to go to the ESP."""
        record = {"state": SENDING, "attempts": attempts, "at": now, "esp": send.get("esp")}
        await self.redis.set(
            record_key(index, send["send_id"]), orjson.dumps(record), ex=self.ttl_s
        )

    async def count_failure(self, index: int, send: dict) -> None:
        """Count one failed attempt (it will be retried or dead-lettered)."""
        await self.redis.hincrby(counts_key(index), _field(send, FAILED), 1)

    async def finish(
        self,
        index: int,
        entry_id: str,
        send: dict,
        state: str,
        *,
        attempts: int,
        now: float,
        detail: str = "",
    ) -> None:
        """Record a final state, count it, and remove the entry from the outbox: atomically."""
        record = {"state": state, "attempts": attempts, "at": now, "detail": detail}
        record["esp"] = send.get("esp")
        key = outbox_key(index)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(record_key(index, send["send_id"]), orjson.dumps(record), ex=self.ttl_s)
            pipe.hincrby(counts_key(index), _field(send, state), 1)
            pipe.xack(key, GROUP, entry_id)
            pipe.xdel(key, entry_id)
            await pipe.execute()

    async def dead_letter(
        self,
        index: int,
        entry_id: str,
        send: dict,
        *,
        error: str,
        attempts: int,
        now: float,
    ) -> str:
        """Park a send in the shard's dead-letter stream with its last error; returns its id."""
        record = {"state": DEAD, "attempts": attempts, "at": now, "detail": error}
        record["esp"] = send.get("esp")
        letter = {"send": send, "error": error, "attempts": attempts, "at": now}
        key = outbox_key(index)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(record_key(index, send["send_id"]), orjson.dumps(record), ex=self.ttl_s)
            pipe.hincrby(counts_key(index), _field(send, DEAD_LETTERED), 1)
            pipe.xadd(dlq_key(index), {"d": orjson.dumps(letter)})
            pipe.xack(key, GROUP, entry_id)
            pipe.xdel(key, entry_id)
            replies = await pipe.execute()
        return f"{index}:{replies[2].decode()}"

    async def ack(self, index: int, entry_id: str) -> None:
        """Drop an entry whose send already has a final record (a replayed duplicate)."""
        key = outbox_key(index)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, GROUP, entry_id)
            pipe.xdel(key, entry_id)
            await pipe.execute()

    # -- counters -----------------------------------------------------------------
    async def counts(self) -> list[dict]:
        """Outcome counters per rule and variant, summed over shards."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for index in range(self.shards):
                    pipe.hgetall(counts_key(index))
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"could not read delivery counters: {exc}") from exc
        totals: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        for reply in replies:
            for field, value in reply.items():
                rule, variant, outcome = field.decode().split("\x1f")
                row = totals[(rule, variant)]
                row[outcome] = row.get(outcome, 0) + int(value)
        return [
            {"rule": rule, "variant": variant or None, **outcomes}
            for (rule, variant), outcomes in sorted(totals.items())
        ]

    # -- dead letters ---------------------------------------------------------------
    async def dead_letters(self, *, count: int = 100) -> list[dict]:
        """The oldest `count` dead letters of every shard, oldest first."""
        out = []
        for index in range(self.shards):
            for sid, fields in await self.redis.xrange(dlq_key(index), count=count):
                out.append(_letter(index, sid.decode(), fields))
        out.sort(key=lambda letter: letter["at"])
        return out[:count]

    async def dead_letter_count(self) -> int:
        """Dead letters waiting, over all shards."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for index in range(self.shards):
                pipe.xlen(dlq_key(index))
            return sum(await pipe.execute())

    async def dead_letter_get(self, letter_id: str) -> dict:
        """One dead letter by its id ("shard:stream-id"); NotFound if absent."""
        index, sid = _parse_letter_id(letter_id, self.shards)
        found = await self.redis.xrange(dlq_key(index), min=sid, max=sid)
        if not found:
            raise NotFound(f"no dead letter {letter_id!r}", field="id")
        return _letter(index, sid, found[0][1])

    async def replay(self, letter_id: str) -> str:
        """Put a dead letter back in its shard's outbox (a fresh retry budget); the new entry id."""
        letter = await self.dead_letter_get(letter_id)
        index, sid = _parse_letter_id(letter_id, self.shards)
        send = letter["send"]
        keys = [dlq_key(index), outbox_key(index), record_key(index, send["send_id"])]
        # Only the replay that removes the letter puts the send back: two at once (an
        # HTTP retry, `--all` from two places) would otherwise send it twice.
        entry = await self.redis.eval(
            _REPLAY, 4, *keys, counts_key(index), sid, orjson.dumps(send), _field(send, REPLAYED)
        )
        if entry is None:
            raise NotFound(f"dead letter {letter_id!r} was replayed meanwhile", field="id")
        return entry.decode()

    async def touch(self, consumer: str, index: int, ids: list[str]) -> None:
        """Reset the idle time of `consumer`'s entries still in progress, so nobody claims them.

        Only those it still holds: one another dispatcher has claimed (this one looked
        dead) stays claimed, rather than passing back and forth between the two.
        """
        if ids:
            await self.redis.eval(_TOUCH, 1, self._keys[index], GROUP, consumer, *ids)


def _letter(index: int, sid: str, fields: dict) -> dict:
    data = orjson.loads(fields[b"d"])
    return {"id": f"{index}:{sid}", "shard": index, **data}


def _parse_letter_id(letter_id: str, shards: int) -> tuple[int, str]:
    index, _, sid = letter_id.partition(":")
    shard = whole_number(index)
    if shard is None or shard >= shards or not sid:
        raise NotFound(
            f"no dead letter {letter_id!r} (ids look like 2:1700000000000-0)", field="id"
        )
    return shard, sid

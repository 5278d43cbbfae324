"""`nudge bench`: a load test of the whole engine with shoppers, real transactions, triggers,
email engagement and content calls at once; every promise checked at the end.

Run:  nudge bench [--duration 60] [--rate 0 (flat out) | --rate 3000] [--json out.json]
                  [--png out.png] [--shards 4] [--connections 8]

1. Starts an embedded Redis and `nudge serve` on it in a temporary directory, with
   the starter rules whose waits are scaled down (--time-scale, default 180: the
   15-minute cart reminder comes after 5 s), so journeys complete within a run.
2. Sends visits for --duration seconds: synthetic shoppers (benchmarks.shoppers) and
   the retail replay (--retail-share of visits), one POST /v1/batch per visit, 1%
   re-sent as SDK retries would; paced at --rate events/s or flat out. With
   --day-seconds the pace follows the daily seasonality curve, a day in that many s.
3. The ESP: the engine's dispatchers deliver to a local webhook receiver in this
   process (`EspReceiver`, configured as the `default` ESP). Each email received is
   rendered (GET /v1/content) and its recipient may open, click and buy (posted back
   as events, as the tracking links would).
4. A reference: the same rules in an in-process Partition, fed the same visits of a
   sample of customers (--check-fraction), decide the sends the engine must decide.
   Visits of a customer are kept --gap s apart and away from the reference's timer
   deadlines, so the comparison does not depend on how fast the engine runs.
5. Final table: achieved rates, latencies, and the promises: events applied ==
   accepted (retries dropped as duplicates); sends decided per rule and variant ==
   the reference's, compared at a moment no timer is near; every expected send
   finished (sent, held out, suppressed or dead-lettered); the ESP got each send
   once, and as many as the delivery records say were sent; no 5xx. Baselines from
   the same run: redis-py XADD of the same events,
   and one core applying them to a Partition with the rules (no I/O), with ratios.
Exit code 1 when a promise is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import heapq
import itertools
import math
import random
import re
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks._http import Connection, basic_auth, build_request, fetch_json, free_port, wait_http
from benchmarks.shoppers import Session, ShopperModel, cycle_retail, retail_sessions, seasonality

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
WRITE = {"Authorization": basic_auth("dev-write-key"), "Content-Type": "application/json"}
CONTENT = {"Authorization": "Bearer dev-content-key"}
ADMIN = {"Authorization": "Bearer dev-admin-key"}
CONTENT_BLOCKS = "profile,cart,recommendations"
CONTENT_DEADLINE_S = 0.2  # the default [content] deadline_ms
CHECK_MARGIN_S = 0.5  # no timer this near the moment decisions are compared
_WAIT = re.compile(r'^(\s*wait\s*=\s*")(\d+(?:\.\d+)?)([smhd])(")', re.MULTILINE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def log(message: str) -> None:
    """Progress to stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


# -- set-up ------------------------------------------------------------------------------


def scaled_rules(text: str, scale: float) -> str:
    """Config text with every rule step's `wait` divided by `scale` (at least 1 s)."""

    def one(match: re.Match) -> str:
        seconds = float(match.group(2)) * _UNIT[match.group(3)] / scale
        return f"{match.group(1)}{max(round(seconds), 1)}s{match.group(4)}"

    return _WAIT.sub(one, text)


def bench_config(
    tmp: Path, *, port: int, shards: int, redis_url: str, scale: float, esp_port: int = 0
) -> Path:
    """config.toml for the run: the shipped one, scaled waits, this run's port, Redis and ESP."""
    text = scaled_rules((REPO / "config.toml").read_text(), scale)
    for key, value in (("port", str(port)), ("shards", str(shards))):
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
    for key, value in (("data_dir", str(tmp / "data")), ("redis_url", redis_url)):
        text = re.sub(rf"^{key} = .*$", f'{key} = "{value}"', text, count=1, flags=re.MULTILINE)
    if esp_port:
        text += (
            "\n[[esp]]\n"
            'name = "default"\n'
            'kind = "webhook"\n'
            f'url = "http://{HOST}:{esp_port}/esp"\n'
            'secret = "bench-webhook-secret"\n'
        )
    path = tmp / "config.toml"
    path.write_text(text)
    return path


# -- the reference ---------------------------------------------------------------------


class Reference:
    """The engine's rules in-process, for a sample of customers: the sends to expect."""

    def __init__(self, config_path: Path, fraction: float):
        from engine.config import load
        from engine.partition import Partition
        from engine.profile import Limits
        from engine.rules import RuleSet

        config = load(config_path, env={})
        e = config.engine
        self.rules = RuleSet.from_sources(config.rules)
        self.partition = Partition(
            lambda _c: True,
            limits=Limits(
                recent_max=e.recent_max,
                recent_window_s=e.recent_window_days * 86400.0,
                dedupe_window_s=e.dedupe_window_s,
                dedupe_max_ids=e.dedupe_max_ids,
            ),
            rules=self.rules,
        )
        self.per_mille = int(fraction * 1000)
        self.expected: dict[str, dict] = {}
        self.events = 0
        self.cpu_s = 0.0

    def sampled(self, customer: str) -> bool:
        """Whether `customer` is in the checked sample (stable across processes)."""
        return zlib.crc32(customer.encode()) % 1000 < self.per_mille

    def next_due(self, customer: str) -> float | None:
        """The customer's next timer deadline in the reference."""
        return self.partition.timers.deadline(customer)

    def apply(self, events: list[dict], now: float) -> None:
        """Fire what is due before the visit, then apply its events in order."""
        started = time.process_time()
        self.partition.tick(now)
        for event in events:
            self.partition.apply(event)
        self.events += len(events)
        self._collect()
        self.cpu_s += time.process_time() - started

    def tick(self, now: float) -> None:
        """Fire every timer due by `now`."""
        started = time.process_time()
        self.partition.tick(now)
        self._collect()
        self.cpu_s += time.process_time() - started

    def _collect(self) -> None:
        part = self.partition
        for send in part._sends:
            self.expected[send["send_id"]] = send
        part._sends = []
        # Nothing is checkpointed here: forget what changed (take_changes would encode it).
        part._dirty.clear()
        part._deleted.clear()


# -- the ESP seam ------------------------------------------------------------------------


class EspReceiver:
    """A local ESP: the webhook the engine's dispatchers deliver to (HTTP/1.1, keep-alive).

    Every request is one email; it answers 200 at once and hands the send to the run
    (engagement, content render). A repeated Idempotency-Key is a duplicate delivery.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, float] = {}
        self.duplicates: list[str] = []
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Listen on 127.0.0.1:port."""
        self._server = await asyncio.start_server(self._serve, HOST, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self._take(body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 11\r\n\r\n{"ok":true}'
                )
                await writer.drain()
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
            asyncio.CancelledError,
        ):
            pass
        finally:
            writer.close()

    def _take(self, body: bytes) -> None:
        try:
            send = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        sid = send.get("send_id")
        if not sid:
            return
        if sid in self.received:
            self.duplicates.append(sid)
            return
        self.received[sid] = time.time()
        self.queue.put_nowait(send)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# -- the run -----------------------------------------------------------------------------


@dataclass
class Tally:
    """Everything the run counted."""

    sessions: int = 0
    requests: int = 0
    accepted: int = 0
    retried_events: int = 0
    non_2xx: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    ingest_s: list[float] = field(default_factory=list)
    content_s: list[float] = field(default_factory=list)
    content_status: dict[int, int] = field(default_factory=dict)
    delivered: int = 0
    esp_s: list[float] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    engagement: dict[str, int] = field(default_factory=dict)
    postponed: int = 0
    timeline: list[dict] = field(default_factory=list)


class Run:
    """One load run against a started engine."""

    def __init__(
        self,
        args: argparse.Namespace,
        port: int,
        reference: Reference,
        receiver: EspReceiver,
        redis_url: str,
    ):
        self.args = args
        self.port = port
        self.host = f"{HOST}:{port}"
        self.reference = reference
        self.receiver = receiver
        self.redis_url = redis_url
        self.trigger_ms: dict[str, float] = {}
        self.tally = Tally()
        self.model = ShopperModel(seed=args.seed)
        self.retail = cycle_retail(retail_sessions(), f"r{args.seed}-")
        self.rng = random.Random(args.seed + 1)
        self.ready: list[tuple[float, int, Session]] = []  # postponed and engagement visits
        self.busy_until: dict[str, float] = {}
        self.seq = itertools.count()
        self.ids = itertools.count()
        self.run_id = f"b{int(time.time())}"
        self.stopping = False
        self.pool: asyncio.Queue[Connection] = asyncio.Queue()
        self.content_pool: asyncio.Queue[Connection] = asyncio.Queue()
        self.inflight: set[asyncio.Task] = set()

    # -- visits
    def _next_session(self, now: float) -> Session | None:
        while self.ready and self.ready[0][0] <= now:
            _, _, session = heapq.heappop(self.ready)
            if self._clear(session, now):
                return session
        for _ in range(20):
            retail = self.rng.random() < self.args.retail_share
            session = next(self.retail) if retail else self.model.session()
            if self._clear(session, now):
                return session
        return None

    def _clear(self, session: Session, now: float) -> bool:
        """True if the visit may go now; otherwise it waits in `ready` for its turn."""
        customer = session.customer
        at = self.busy_until.get(customer, 0.0)
        if self.reference.sampled(customer):
            due = self.reference.next_due(customer)
            margin = self.args.margin
            if due is not None and due - margin <= now <= due + margin:
                at = max(at, due + margin)
        if at > now:
            self.tally.postponed += 1
            heapq.heappush(self.ready, (at, next(self.seq), session))
            return False
        self.busy_until[customer] = now + self.args.gap
        return True

    def _body(self, session: Session, now: float) -> tuple[bytes, list[dict]]:
        stamp = datetime.fromtimestamp(now, UTC).isoformat()
        batch = []
        for m in session.messages:
            batch.append(
                {**m, "messageId": f"{self.run_id}-{next(self.ids):x}", "timestamp": stamp}
            )
        # No sentAt: the API would correct timestamps by the request's transit time, and
        # the reference must see exactly the timestamps the shards see.
        return orjson.dumps({"batch": batch}), batch

    async def _post(self, body: bytes) -> int:
        conn = await self.pool.get()
        started = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(
                conn.send(build_request("POST", "/v1/batch", self.host, body=body, headers=WRITE)),
                30.0,
            )
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            self.tally.errors += 1
            await conn.close()
            return 0
        finally:
            self.pool.put_nowait(conn)
        self.tally.ingest_s.append(time.perf_counter() - started)
        self.tally.requests += 1
        if not 200 <= status < 300:
            self.tally.non_2xx[status] = self.tally.non_2xx.get(status, 0) + 1
        return status

    async def _visit(self, session: Session, now: float) -> None:
        body, batch = self._body(session, now)
        if self.reference.sampled(session.customer):
            from engine.events import normalize_batch

            events, _ = normalize_batch({"batch": batch}, received_at=now, body_bytes=len(body))
        else:
            events = None
        status = await self._post(body)
        if status != 200:
            return
        self.tally.accepted += len(batch)
        self.tally.sessions += 1
        self.tally.kinds[session.kind] = self.tally.kinds.get(session.kind, 0) + 1
        if events is not None:
            self.reference.apply(events, now)
        retry = self.rng.random() < self.args.retry_share  # an SDK retry of the same batch
        if retry and await self._post(body) == 200:
            self.tally.retried_events += len(batch)
            if events is not None:
                self.reference.apply(events, now)
        if self.rng.random() < self.args.content_share:
            await self._content(session.customer)

    async def _content(self, customer: str) -> None:
        conn = await self.content_pool.get()
        path = f"/v1/content/{customer}?blocks={CONTENT_BLOCKS}"
        started = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(
                conn.send(build_request("GET", path, self.host, headers=CONTENT)), 30.0
            )
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            self.tally.errors += 1
            await conn.close()
            return
        finally:
            self.content_pool.put_nowait(conn)
        self.tally.content_s.append(time.perf_counter() - started)
        self.tally.content_status[status] = self.tally.content_status.get(status, 0) + 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def generate(self, duration: float) -> None:
        """Send visits for `duration` seconds, paced or flat out."""
        args = self.args
        started = time.monotonic()
        budget = 0.0  # events the pace allows so far
        last = started
        limit = asyncio.Semaphore(args.connections)
        while (now_m := time.monotonic()) - started < duration:
            if args.rate > 0:
                rate = args.rate
                if args.day_seconds > 0:
                    hour = (now_m - started) / args.day_seconds * 24.0
                    rate *= seasonality(hour) / (sum(map(seasonality, range(24))) / 24)
                budget += (now_m - last) * rate
                last = now_m
                if budget < 1:
                    await asyncio.sleep(min((1 - budget) / rate, 0.05))
                    continue
            session = self._next_session(time.time())
            if session is None:
                await asyncio.sleep(0.01)
                continue
            budget -= len(session.messages)
            await limit.acquire()
            now = time.time()

            async def one(s: Session = session, at: float = now) -> None:
                try:
                    await self._visit(s, at)
                finally:
                    limit.release()

            self._spawn(one())
        self.stopping = True
        if self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)

    async def esp(self) -> None:
        """What recipients do with delivered emails: render the content, open, click, buy."""
        tally = self.tally
        while True:
            send = await self.receiver.queue.get()
            tally.delivered += 1
            if self.stopping:
                continue
            self._spawn(self._content(send["customer"]))
            for visit in self.model.engagement({**send, "deliver": True}):
                for m in visit.messages:
                    k = m.get("event", m["type"])
                    tally.engagement[k] = tally.engagement.get(k, 0) + 1
                delay = self.rng.uniform(0.5, 3.0)
                heapq.heappush(self.ready, (time.time() + delay, next(self.seq), visit))

    async def ticker(self) -> None:
        """Keep the reference's timers firing on time."""
        while True:
            self.reference.tick(time.time())
            await asyncio.sleep(0.05)

    async def progress(self, started: float) -> None:
        """One progress line every 2 s; the timeline for the chart."""
        tally = self.tally
        prev = (started, 0, 0, 0, 0)
        while True:
            await asyncio.sleep(2.0)
            now = time.monotonic()
            try:
                totals = await engine_totals(self.port)
            except Exception:
                totals = {"processed": prev[2]}
            dt = now - prev[0]
            accepted = tally.accepted + tally.retried_events
            point = {
                "t": round(now - started, 2),
                "accepted_s": (accepted - prev[1]) / dt,
                "applied_s": (totals["processed"] - prev[2]) / dt,
                "sends_s": (tally.delivered - prev[3]) / dt,
                "content_s": (len(tally.content_s) - prev[4]) / dt,
                "content_p99_ms": _pct(tally.content_s[prev[4] :], 99) * 1000,
            }
            tally.timeline.append(point)
            prev = (now, accepted, totals["processed"], tally.delivered, len(tally.content_s))
            log(
                f"[{point['t']:6.1f}s] {point['accepted_s']:8,.0f} ev/s accepted"
                f" {point['applied_s']:8,.0f} applied  {tally.delivered:6,} emails at the ESP"
                f"  content {point['content_s']:6,.0f}/s p99 {point['content_p99_ms']:6.1f} ms"
                f"  backlog {accepted - totals['processed']:,}"
            )

    async def main(self, duration: float) -> dict[str, Any]:
        """Open connections, run, drain, check; returns the result."""
        for pool, n in ((self.pool, self.args.connections), (self.content_pool, 4)):
            for _ in range(n):
                pool.put_nowait(await Connection(HOST, self.port).open())
        started = time.monotonic()
        helpers = [
            asyncio.ensure_future(c)
            for c in (self.esp(), self.ticker(), self.progress(started))
        ]  # fmt: skip
        await self.generate(duration)
        load_s = time.monotonic() - started
        log("load stopped; waiting until the shards applied everything")
        target = self.tally.accepted + self.tally.retried_events
        totals: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            totals = await engine_totals(self.port)
            if totals["processed"] >= target:
                break
            await asyncio.sleep(0.1)
        drained_s = time.monotonic() - started
        # Compare decisions at a moment no timer of any customer is near, so the engine
        # and the reference have decided exactly the same sends whatever their speeds.
        at, near = self._quiet_moment(time.time() + 1.0)
        await asyncio.sleep(max(at - time.time(), 0.0))
        helpers[1].cancel()  # the ticker: the reference stops at `at`
        self.reference.tick(at)
        status, text = await _metrics(self.port)
        decided = _by_rule(text) if status == 200 else {}
        self.trigger_ms = _hist_ms(text, "nudge_trigger_latency_seconds") if status == 200 else {}
        log("waiting for the dispatchers to finish the outbox")
        delivery = await self._delivery_done()
        records = await self._records(self.reference.expected)
        await asyncio.sleep(0.5)  # the last deliveries reach the receiver
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        for pool in (self.pool, self.content_pool):
            while not pool.empty():
                await pool.get_nowait().close()
        return self.report(load_s, drained_s, totals, decided, near, delivery, records)

    def _quiet_moment(self, earliest: float) -> tuple[float, int]:
        """The first time from `earliest` (searching 20 s) with no reference timer within
        CHECK_MARGIN_S of it; and how many deadlines are that near (0 unless none was found).

        Once the load has stopped the shards are idle and fire timers within milliseconds
        of their deadlines, so a smaller margin than --margin (which covers ingest lag
        under load) is enough here.
        """
        margin = CHECK_MARGIN_S
        deadlines = sorted(self.reference.partition.timers._want.values())
        best = (earliest, len(deadlines) + 1)
        t = earliest
        while t < earliest + 20.0:
            lo = bisect.bisect_left(deadlines, t - margin)
            hi = bisect.bisect_right(deadlines, t + margin)
            if hi - lo < best[1]:
                best = (t, hi - lo)
            if hi == lo:
                return t, 0
            t = deadlines[hi - 1] + margin + 0.01
        return best

    async def _delivery_done(self, timeout: float = 60.0) -> dict[str, Any]:
        """GET /v1/delivery once its backlog is empty (or at the timeout)."""
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, body = await fetch_json(HOST, self.port, "/v1/delivery", headers=ADMIN)
            if status != 200:
                return {"error": status}
            if not body.get("backlog") and not body.get("pending"):
                break
            await asyncio.sleep(0.2)
        return body or {}

    async def _records(self, sends: dict[str, dict]) -> dict[str, str]:
        """The delivery record state of each send (absent: never handled)."""
        from engine.delivery.ledger import record_key
        from engine.routing import shard_for
        from engine.store import connect

        client = connect(self.redis_url)
        out: dict[str, str] = {}
        try:
            ids = list(sends)
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                async with client.pipeline(transaction=False) as pipe:
                    for sid in chunk:
                        customer = sends[sid]["customer"]
                        pipe.get(record_key(shard_for(customer, self.args.shards), sid))
                    for sid, raw in zip(chunk, await pipe.execute(), strict=True):
                        if raw:
                            out[sid] = orjson.loads(raw).get("state", "?")
        finally:
            await client.aclose()
        return out

    def report(
        self,
        load_s: float,
        drained_s: float,
        totals: dict,
        decided: dict[tuple[str, str], float],
        near: int,
        delivery: dict,
        records: dict[str, str],
    ) -> dict[str, Any]:
        """Figures and promises of the run."""
        t, ref = self.tally, self.reference
        # event (or timer) to ESP: from each send's due time to its arrival here
        t.esp_s = [
            max(received - ref.expected[sid]["at"], 0.0)
            for sid, received in self.receiver.received.items()
            if sid in ref.expected
        ]
        expected = _count((s["rule"], s.get("variant") or "-") for s in ref.expected.values())
        want_sent = sum(
            1 for sid, state in records.items() if state == "sent"
        )  # fmt: skip
        accepted = t.accepted + t.retried_events
        content_ok = sum(n for s, n in t.content_status.items() if s in (200, 404))
        outcomes = _count_outcomes(delivery.get("outcomes", []))
        unfinished = [sid for sid in ref.expected if records.get(sid) not in FINAL_STATES]
        # Receipts of the sends decided by the quiet moment only: a timer that fires
        # after it sends an email the reference (and `records`) does not know of.
        received = [sid for sid in self.receiver.received if sid in ref.expected]
        astray = {sid: records.get(sid) for sid in received if records.get(sid) != "sent"}
        if astray:
            log(f"at the ESP but not recorded sent: {sorted(astray.items())[:10]}")
        every = ref.per_mille >= 1000
        promises = {
            "events applied == accepted - retries": (
                totals.get("applied"), accepted - t.retried_events,
                totals.get("applied") == accepted - t.retried_events,
            ),
            "retries dropped as duplicates": (
                totals.get("duplicate"), t.retried_events,
                totals.get("duplicate") == t.retried_events,
            ),
            "no event failed or was dropped": (
                totals.get("failed", 0) + totals.get("dropped", 0), 0,
                totals.get("failed", 0) + totals.get("dropped", 0) == 0,
            ),
            "sends decided == reference, per rule and variant": (
                int(sum(decided.values())), sum(expected.values()),
                (decided == expected) if every else None,
            ),
            "every expected send delivered, held out or suppressed": (
                len(ref.expected) - len(unfinished), len(ref.expected), not unfinished,
            ),
            "the ESP got each send once": (
                len(self.receiver.duplicates), 0, not self.receiver.duplicates,
            ),
            "ESP receipts == sends recorded sent": (
                len(received), want_sent, len(received) == want_sent,
            ),
            "no 5xx, no transport error": (
                sum(n for s, n in t.non_2xx.items() if s >= 500) + t.errors
                + sum(n for s, n in t.content_status.items() if s >= 500), 0,
                not t.errors and all(s < 500 for s in [*t.non_2xx, *t.content_status]),
            ),
            "every content call answered (200/404)": (
                content_ok, len(t.content_s), content_ok == len(t.content_s),
            ),
        }  # fmt: skip
        if not every:  # the per-rule totals include customers the reference did not see
            del promises["sends decided == reference, per rule and variant"]
        return {
            "load_s": round(load_s, 2),
            "drained_s": round(drained_s, 2),
            "sessions": t.sessions,
            "visits_by_kind": t.kinds,
            "events_accepted": accepted,
            "events_accepted_s": round(accepted / load_s, 1),
            "events_applied_s": round(totals.get("processed", 0) / drained_s, 1),
            "ingest_ms": _ms(t.ingest_s),
            "content_calls": len(t.content_s),
            "content_calls_s": round(len(t.content_s) / load_s, 1),
            "content_ms": _ms(t.content_s),
            "content_status": {str(k): v for k, v in t.content_status.items()},
            "content_over_deadline": sum(1 for x in t.content_s if x > CONTENT_DEADLINE_S),
            "sends": int(sum(decided.values())),
            "sends_by_rule": _count_rules(decided),
            "delivery_outcomes": outcomes,
            "emails_at_esp": len(self.receiver.received),
            "sent_records": want_sent,
            "trigger_ms": self.trigger_ms,
            "esp_ms": _ms(t.esp_s),
            "engagement_events": t.engagement,
            "postponed_visits": t.postponed,
            "reference": {
                "customers_sampled_per_mille": ref.per_mille,
                "events": ref.events,
                "expected_sends": len(ref.expected),
                "deadlines_near_the_check": near,
                "by_rule_variant": {f"{r}/{v}": n for (r, v), n in sorted(expected.items())},
                "engine_by_rule_variant": {f"{r}/{v}": n for (r, v), n in sorted(decided.items())},
                "unfinished": unfinished[:10],
            },
            "profiles": totals.get("profiles"),
            "shard_rss_mb": round(totals.get("rss_bytes", 0) / 2**20, 1),
            "promises": {
                k: {"got": got, "want": want, "ok": ok} for k, (got, want, ok) in promises.items()
            },
            "timeline": t.timeline,
            "_reference_cpu_s": ref.cpu_s,
        }


FINAL_STATES = frozenset({"sent", "suppressed", "holdout", "dead"})


def _by_rule(text: str) -> dict[tuple[str, str], float]:
    """nudge_triggers_total by (rule, variant) from /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nudge_triggers_total":
                key = (sample.labels["rule"], sample.labels["variant"])
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _hist_ms(text: str, name: str) -> dict[str, float]:
    """p50 / p99 (ms) and count of a histogram in /metrics text, summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    from engine.metrics.hist import quantile

    cum: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name + "_bucket":
                le = float(sample.labels["le"])
                cum[le] = cum.get(le, 0.0) + sample.value
    bounds = sorted(cum)
    counts = [cum[b] - (cum[bounds[i - 1]] if i else 0.0) for i, b in enumerate(bounds)]
    finite = [b for b in bounds if b != math.inf]
    p50, p99 = quantile(finite, counts, 0.5), quantile(finite, counts, 0.99)
    return {
        "p50": round((p50 or math.nan) * 1000, 1),
        "p99": round((p99 or math.nan) * 1000, 1),
        "n": int(sum(counts)),
    }


def _count_rules(decided: dict[tuple[str, str], float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (rule, _), n in decided.items():
        out[rule] = out.get(rule, 0) + int(n)
    return out


def _count_outcomes(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, int) and key not in ("rule", "variant"):
                out[key] = out.get(key, 0) + value
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(max(math.ceil(q / 100 * len(ordered)), 1), len(ordered)) - 1]


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(_pct(values, 50) * 1000, 2),
        "p99": round(_pct(values, 99) * 1000, 2),
        "max": round(max(values) * 1000, 2) if values else math.nan,
        "n": len(values),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


async def engine_totals(port: int) -> dict[str, Any]:
    """Shard counters from /v1/status, summed."""
    status, body = await fetch_json(HOST, port, "/v1/status", headers=ADMIN)
    if status != 200 or not body:
        raise RuntimeError(f"/v1/status answered {status}")
    totals = dict.fromkeys(("applied", "duplicate", "dropped", "forwarded", "failed"), 0)
    totals.update(profiles=0, rss_bytes=0)
    for shard in body["shards"]:
        for name in ("applied", "duplicate", "dropped", "forwarded"):
            totals[name] += (shard.get("stats") or {}).get(name, 0)
        totals["failed"] += shard.get("failed_events", 0)
        totals["profiles"] += shard.get("profiles", 0)
        totals["rss_bytes"] += shard.get("rss_bytes", 0)
    totals["processed"] = sum(
        totals[k] for k in ("applied", "duplicate", "dropped", "forwarded", "failed")
    )
    return totals


# -- baselines, output, main --------------------------------------------------------------


def redis_baseline(tmp: Path, seconds: float, model: ShopperModel) -> dict[str, Any]:
    """redis-py XADD of 100-event entries like the API writes, pipelined: events/s."""
    from benchmarks.ingest import bench_redis
    from engine.events import normalize_batch

    now = time.time()
    payloads = []
    for k in range(32):
        batch = []
        while len(batch) < 100:
            for m in model.session().messages:
                batch.append({**m, "messageId": f"x{k}-{len(batch)}"})
        events, _ = normalize_batch({"batch": batch[:100]}, received_at=now, body_bytes=0)
        payloads.append(orjson.dumps(events))
    return bench_redis(tmp, payloads, seconds)


def table(result: dict[str, Any]) -> str:
    """The final table, as text."""
    r = result
    rows = [
        ("load", f"{r['load_s']:.1f} s, {r['sessions']:,} visits {r['visits_by_kind']}"),
        ("events accepted", f"{r['events_accepted']:,} ({r['events_accepted_s']:,.0f}/s)"),
        ("events applied, end to end", f"{r['events_applied_s']:,.0f}/s"),
        ("ingest latency p50 / p99 / max", _fmt_ms(r["ingest_ms"])),
        ("content calls", f"{r['content_calls']:,} ({r['content_calls_s']:,.1f}/s)"),
        ("content latency p50 / p99 / max", _fmt_ms(r["content_ms"])),
        ("content answers later than 200 ms", f"{r['content_over_deadline']:,} (client side)"),
        ("sends decided (to the outbox)", f"{r['sends']:,}"),
        ("sends by rule", ", ".join(f"{k} {v}" for k, v in sorted(r["sends_by_rule"].items()))),
        (
            "delivery outcomes",
            ", ".join(f"{k} {v}" for k, v in sorted(r["delivery_outcomes"].items())),
        ),
        ("emails at the local ESP", f"{r['emails_at_esp']:,}"),
        ("due -> outbox latency p50 / p99", _fmt_pct(r["trigger_ms"])),
        ("due -> ESP latency p50 / p99 / max", _fmt_ms(r["esp_ms"])),
        ("engagement posted", ", ".join(f"{k} {v}" for k, v in r["engagement_events"].items())),
        ("profiles / shard memory", f"{r['profiles']:,} / {r['shard_rss_mb']:,} MB"),
    ]
    base = r.get("baselines", {})
    if "redis_xadd_events_s" in base:
        rows.append(
            (
                "baseline: redis-py XADD, 100-event entries",
                f"{base['redis_xadd_events_s']:,.0f} ev/s (Nudge accepted "
                f"{base['ratio_accepted_to_xadd']:.3f}x)",
            )
        )
    if "core_events_per_cpu_s" in base:
        rows.append(
            (
                "baseline: one core, Partition + rules, no I/O",
                f"{base['core_events_per_cpu_s']:,.0f} ev/s (Nudge applied "
                f"{base['ratio_applied_to_core']:.2f}x)",
            )
        )
    width = max(len(k) for k, _ in rows) + 2
    out = [f"{k:<{width}}{v}" for k, v in rows]
    out.append("")
    out.append("promises:")
    for name, p in r["promises"].items():
        mark = "kept  " if p["ok"] else "BROKEN"
        out.append(f"  [{mark}] {name:<42} got {p['got']}, want {p['want']}")
    return "\n".join(out)


def _fmt_pct(m: dict[str, float]) -> str:
    if not m:
        return "-"
    return f"{m['p50']:.1f} / {m['p99']:.1f} ms (n={m['n']:,}, from /metrics buckets)"


def _fmt_ms(m: dict[str, float]) -> str:
    return f"{m['p50']:.1f} / {m['p99']:.1f} / {m['max']:.1f} ms (n={m['n']:,})"


def chart(result: dict[str, Any], path: Path) -> None:
    """A PNG: rates over the run, and Nudge beside its baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    fig, (top, mid, bottom) = plt.subplots(3, 1, figsize=(9, 9))
    t = [p["t"] for p in timeline]
    top.plot(t, [p["accepted_s"] for p in timeline], label="accepted ev/s")
    top.plot(t, [p["applied_s"] for p in timeline], label="applied ev/s")
    top.set_ylabel("events/s")
    top.legend()
    top.set_title("nudge bench")
    mid.plot(t, [p["sends_s"] for p in timeline], label="emails at the ESP/s", color="tab:red")
    mid.plot(t, [p["content_s"] for p in timeline], label="content calls/s", color="tab:purple")
    ax = mid.twinx()
    ax.plot(t, [p["content_p99_ms"] for p in timeline], label="content p99 ms", color="tab:gray",
            linestyle="--")  # fmt: skip
    ax.set_ylabel("ms")
    mid.set_xlabel("seconds")
    mid.legend(loc="upper left")
    base = result.get("baselines", {})
    names = ["Nudge accepted", "Nudge applied"]
    values = [result["events_accepted_s"], result["events_applied_s"]]
    for key, label in (
        ("redis_xadd_events_s", "redis XADD"),
        ("core_events_per_cpu_s", "core, 1 CPU"),
    ):
        if key in base:
            names.append(label)
            values.append(base[key])
    bottom.barh(
        names, values, color=["tab:blue", "tab:orange", "tab:gray", "tab:gray"][: len(names)]
    )
    bottom.set_xscale("log")
    bottom.set_xlabel("events/s (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start Redis and the engine, run the load, stop everything; the result."""
    from benchmarks.ingest import Server
    from engine.redis_server import EmbeddedRedis

    tmp = Path(tempfile.mkdtemp(prefix="nudge-bench-"))
    redis_server = EmbeddedRedis(tmp / "redis")
    redis_url = redis_server.start()
    port = free_port()
    receiver = EspReceiver()
    config = bench_config(tmp, port=port, shards=args.shards, redis_url=redis_url,
                          scale=args.time_scale, esp_port=receiver.port)  # fmt: skip
    argv = [sys.executable, "-m", "engine", "serve", "--config", str(config)]
    server = Server("nudge serve", argv, cwd=tmp, log_path=tmp / "serve.log")
    result: dict[str, Any] = {}
    try:
        log(f"starting nudge serve ({args.shards} shards) in {tmp}")
        server.start()
        started = time.monotonic()
        asyncio.run(wait_http(HOST, port, "/readyz", timeout=120.0, alive=server.alive))
        log(f"engine ready in {time.monotonic() - started:.1f} s; load for {args.duration:g} s")
        reference = Reference(config, args.check_fraction)

        async def go() -> dict[str, Any]:
            await receiver.start()
            try:
                return await Run(args, port, reference, receiver, redis_url).main(args.duration)
            finally:
                await receiver.close()

        result = asyncio.run(go())
        status, metrics_text = asyncio.run(_metrics(port))
        result["metrics"] = metric_totals(metrics_text) if status == 200 else {}
    finally:
        stop_s = server.stop()
        log(f"nudge serve stopped in {stop_s:.1f} s")
        if result and not all(p["ok"] for p in result.get("promises", {}).values()):
            result["engine_log_tail"] = server.log_tail(40)
        redis_server.stop()
    base: dict[str, Any] = {}
    if args.baseline_seconds > 0:
        log("baselines")
        xadd = redis_baseline(tmp, args.baseline_seconds, ShopperModel(seed=args.seed + 2))
        base["redis_xadd_events_s"] = xadd["events_s"]
        base["ratio_accepted_to_xadd"] = result["events_accepted_s"] / xadd["events_s"]
    cpu = result.pop("_reference_cpu_s", 0.0)
    if cpu > 0 and result["reference"]["events"] > 1000:
        base["core_events_per_cpu_s"] = round(result["reference"]["events"] / cpu, 1)
        base["ratio_applied_to_core"] = result["events_applied_s"] / base["core_events_per_cpu_s"]
    result["baselines"] = base
    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return result


def metric_totals(text: str) -> dict[str, float]:
    """A few /metrics series summed over their labels, to show beside the bench's own counts."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "nudge_ingest_events_total",
        "nudge_shard_events_total",
        "nudge_triggers_total",
        "nudge_funnel_total",
        "nudge_funnel_conversions_total",
        "nudge_content_requests_total",
        "nudge_content_fallbacks_total",
    }
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                key = sample.name
                for label in ("stage", "within", "outcome"):
                    if label in sample.labels:
                        key += f"{{{label}={sample.labels[label]}}}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def _metrics(port: int) -> tuple[int, str]:
    conn = await Connection(HOST, port).open()
    try:
        status, body = await conn.send(build_request("GET", "/metrics", f"{HOST}:{port}",
                                                     headers=ADMIN))  # fmt: skip
    finally:
        await conn.close()
    return status, body.decode()


def main(argv: list[str] | None = None) -> int:
    """`nudge bench`."""
    parser = argparse.ArgumentParser(prog="nudge bench", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: flat out")
    parser.add_argument("--connections", type=int, default=8, help="ingest requests in flight")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--retail-share", type=float, default=0.3, help="visits from the replay")
    parser.add_argument(
        "--content-share",
        type=float,
        default=0.05,
        help="visits that also fetch content (besides one per delivered send)",
    )
    parser.add_argument("--retry-share", type=float, default=0.01, help="batches sent twice")
    parser.add_argument(
        "--day-seconds",
        type=float,
        default=0.0,
        help="with --rate: a day of seasonality in this many seconds",
    )
    parser.add_argument("--time-scale", type=float, default=180.0, help="rule waits divided by")
    parser.add_argument(
        "--gap", type=float, default=5.0, help="min seconds between a shopper's visits"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=2.0,
        help="seconds kept between a visit and the shopper's timer deadlines",
    )
    parser.add_argument(
        "--check-fraction",
        type=float,
        default=1.0,
        help="share of customers whose sends are checked against the reference "
        "(below 1, only per send id: the per-rule totals need every customer)",
    )
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--png", type=Path, help="write a chart here (needs matplotlib)")
    args = parser.parse_args(argv)
    result = run_bench(args)
    print(table(result), flush=True)
    if args.json:
        args.json.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    if args.png:
        try:
            chart(result, args.png)
        except ImportError:
            log("no PNG: matplotlib is not installed (pip install -e '.[bench]')")
    return 0 if all(p["ok"] for p in result["promises"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

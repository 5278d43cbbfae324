"""Ingest benchmark: Nudge end to end on this machine, beside baselines from the same run.

Run:  python -m benchmarks.ingest [--shards 4] [--duration 10] [--json out.json]

1. Starts `nudge serve` as a subprocess in a fresh temporary data dir.
2. Flat out for --duration seconds: many keep-alive connections POST /v1/batch
   bodies of 100 shopper track events each. Reports events/s accepted (2xx),
   events/s applied end to end (first send until /v1/status shows every event
   applied) and request latency.
3. Paced at half the flat-out applied rate for the same time: request latency
   p50/p99/p99.9, measured from each request's scheduled send time, and the
   slowest seconds, marked where Redis was rewriting its AOF (a rewrite every
   5 s was most of the tail before 313453d).
4. Checks the promise: every accepted event applied exactly once.
5. Baselines: bare Starlette+uvicorn parsing the same bodies; redis-py XADD of
   one 100-event entry per command, pipelined; one Ray actor call per event.
6. Memory per profile (tracemalloc over Partition.apply) and checkpoint bytes.

Request bodies are built before timing as templates whose messageIds and
timestamps hold placeholders; each request stamps in a fresh counter and the
current time with two bytes.replace calls (about 20 µs), so every event has a
unique messageId and each shopper's events arrive in time order. The paced
phase stamps all its requests before it starts. There are --templates of them
(4,096, 126 MB, built in about 2 s): with 256, a 20 s run sent each body about
40 times, so every shopper repeated the same few events over and over, and the
shards' per-event costs that grow with a repetitive history (co-occurrence
pairing, count() index rebuilds) came out about 25% higher than on fresh traffic.

CPU use per component (API process, shard actors, Redis, Ray's own processes,
the load generator, everything else) is read from /proc for each phase, as
this 2-core machine is often shared with other work.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import ctypes
import gc
import itertools
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks._http import (
    Connection,
    basic_auth,
    build_request,
    fetch_json,
    free_port,
    latency_ms,
    wait_http,
)
from engine.config import EngineConfig

HOST = "127.0.0.1"
BATCH = 100
WRITE_HEADERS = {"Authorization": basic_auth("dev-write-key"), "Content-Type": "application/json"}
ADMIN_HEADERS = {"Authorization": "Bearer dev-admin-key"}
TARGET_APPLIED_EVENTS_S = 50_000.0
TARGET_P99_MS = 20.0
REPO = Path(__file__).resolve().parents[1]
_STAMP = b"@@@@@@@@@@@@"  # replaced per request by a 12-hex-digit counter
# Replaced per request by its time to 100 µs, ISO-8601, 24 chars; each event then adds
# its position as the last two digits of the microseconds, so a request's events have
# distinct times, as an SDK's batch has (one time for all would make every shopper's
# events tie).
_TIME_STAMP = b"~~~~~~~~~~~~~~~~~~~~~~~~"
_CATEGORIES = (
    "Shoes", "Dresses", "Shirts", "Jeans", "Jackets", "Bags", "Watches", "Jewelry",
    "Beauty", "Home", "Kitchen", "Toys", "Books", "Sports", "Outdoor", "Electronics",
)  # fmt: skip
_EVENT_MIX = (("Product Viewed", 0.75), ("Product Added", 0.18), ("Order Completed", 0.07))
_LIBRARY = {"library": {"name": "analytics-python", "version": "2.3.0"}}


def log(message: str) -> None:
    """One progress line on stdout, flushed at once."""
    print(message, flush=True)


# -- workload ----------------------------------------------------------------


def _zipf_cumulative(n: int, exponent: float) -> list[float]:
    """Cumulative weights of ranks 1..n under a power law (to bisect into)."""
    total, out = 0.0, []
    for rank in range(1, n + 1):
        total += rank**-exponent
        out.append(total)
    return out


@dataclass(frozen=True)
class Catalog:
    """Shoppers and products, each drawn with a power-law popularity."""

    users: list[str]
    user_cum: list[float]
    products: list[tuple[str, float, str]]  # (product_id, price, category)
    product_cum: list[float]

    @classmethod
    def build(cls, rng: random.Random, users: int, products: int = 2000) -> Catalog:
        """A catalog of `users` shoppers and `products` products."""
        items = [
            (f"p-{i:05d}", round(rng.lognormvariate(3.3, 0.8), 2), rng.choice(_CATEGORIES))
            for i in range(products)
        ]
        return cls(
            users=[f"user-{rng.getrandbits(40):010x}" for _ in range(users)],
            user_cum=_zipf_cumulative(users, 0.8),
            products=items,
            product_cum=_zipf_cumulative(products, 1.0),
        )

    def user(self, rng: random.Random) -> str:
        """One shopper id, popular ones more often."""
        return self.users[bisect.bisect(self.user_cum, rng.random() * self.user_cum[-1])]

    def product(self, rng: random.Random) -> tuple[str, float, str]:
        """One product, popular ones more often."""
        return self.products[bisect.bisect(self.product_cum, rng.random() * self.product_cum[-1])]


def shopper_properties(rng: random.Random, catalog: Catalog, name: str) -> dict[str, Any]:
    """Segment e-commerce properties for one event named `name`."""
    product_id, price, category = catalog.product(rng)
    props: dict[str, Any] = {"product_id": product_id, "price": price, "category": category}
    if name == "Product Added":
        props["quantity"] = rng.choice((1, 1, 1, 2))
        props["cart_id"] = f"cart-{rng.getrandbits(32):08x}"
    elif name == "Order Completed":
        props["order_id"] = f"order-{rng.getrandbits(48):012x}"
        props["revenue"] = price
        props["products"] = [
            {"product_id": product_id, "price": price, "category": category, "quantity": 1}
        ]
    return props


def shopper_message(rng: random.Random, catalog: Catalog, message_id: str, when: str) -> dict:
    """One raw Segment track message as an SDK sends it."""
    name = rng.choices([n for n, _ in _EVENT_MIX], [w for _, w in _EVENT_MIX])[0]
    return {
        "type": "track",
        "event": name,
        "userId": catalog.user(rng),
        "messageId": message_id,
        "timestamp": when,
        "properties": shopper_properties(rng, catalog, name),
        "context": _LIBRARY,
    }


def batch_template(rng: random.Random, catalog: Catalog, run_id: str, host: str) -> bytes:
    """A whole POST /v1/batch request whose messageIds still hold the stamp placeholder."""
    stamp, when = _STAMP.decode(), _TIME_STAMP.decode()
    batch = [
        shopper_message(rng, catalog, f"{run_id}-{stamp}-{i:02d}", f"{when}{i:02d}Z")
        for i in range(BATCH)
    ]
    body = orjson.dumps({"batch": batch})
    return build_request("POST", "/v1/batch", host, body=body, headers=WRITE_HEADERS)


def iso_slot(slot: int) -> bytes:
    """Time `slot` (in 100 µs since the epoch) as 24 bytes of ISO-8601, without the zone."""
    seconds, tenths_ms = divmod(slot, 10_000)
    return b"%s.%04d" % (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode(),
        tenths_ms,
    )


class RequestSource:
    """Pre-built batch requests; each use stamps in fresh messageIds and the current time.

    Every request takes its own 100 µs slot of time, the current one or the one
    after the last request's if that is later, and each of its events adds its
    position in microseconds. So events are in time order in the order requests
    are stamped, even for the requests of a paced phase, stamped together before
    it starts. Stamped to the millisecond, those shared milliseconds by the dozen,
    and a shopper's event could carry an earlier time than one sent before it.
    """

    def __init__(self, templates: list[bytes]):
        self.templates = templates
        self.count = 0
        self.slot = 0

    def next(self) -> bytes:
        """The next request, its 100 messageIds never used before."""
        n = self.count
        self.count += 1
        template = self.templates[n % len(self.templates)]
        self.slot = max(int(time.time() * 10_000), self.slot + 1)
        return template.replace(_STAMP, b"%012x" % n).replace(_TIME_STAMP, iso_slot(self.slot))

    def take(self, n: int) -> list[bytes]:
        """The next `n` requests, built now (for phases that must not build while timed)."""
        return [self.next() for _ in range(n)]


def make_source(
    rng: random.Random, catalog: Catalog, host: str, templates: int = 4096
) -> RequestSource:
    """A request source over `templates` distinct batch bodies."""
    run_id = f"b{rng.getrandbits(24):06x}"
    return RequestSource([batch_template(rng, catalog, run_id, host) for _ in range(templates)])


# -- subprocesses --------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGINT when the benchmark dies, so no server outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


class Server:
    """A server subprocess in its own session, logging to a file, stopped with SIGINT."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.log_path = log_path
        # The caller's NUDGE_* settings never leak in; these (the run's own) do.
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        """Launch the process (returns at once; poll it with `wait_http`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NUDGE_", "RAY_ADDRESS"))}
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the process wrote."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 60.0) -> float:
        """SIGINT, wait for a clean exit (SIGKILL the group if it hangs); seconds taken."""
        if not self.alive():
            return 0.0
        assert self.proc is not None
        started = time.perf_counter()
        try:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            log(f"{self.name}: no clean exit; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return time.perf_counter() - started


# -- CPU accounting --------------------------------------------------------------


def _pid_cpu_s(pid: int) -> float:
    """CPU seconds of one process and its reaped children (Redis AOF rewrites); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def child_pids(parent: int) -> list[int]:
    """Pids of the direct children of `parent`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rpartition(")")[2].split()[1]) == parent:
                    out.append(int(entry))
    return out


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores) so far."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _pid_wait_s(pid: int) -> float:
    """Seconds the threads of one process have spent runnable but waiting for a CPU."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9


@dataclass
class CpuSample:
    """CPU and run-queue seconds so far per named group of pids, and of the machine."""

    at: float
    machine: float
    cpu: dict[str, float]
    wait: dict[str, float]

    @classmethod
    def take(cls, groups: dict[str, list[int]]) -> CpuSample:
        """Read /proc now."""
        return cls(
            at=time.perf_counter(),
            machine=_machine_busy_s(),
            cpu={name: sum(map(_pid_cpu_s, pids)) for name, pids in groups.items()},
            wait={name: sum(map(_pid_wait_s, pids)) for name, pids in groups.items()},
        )

    def until(self, later: CpuSample) -> dict[str, dict[str, float]]:
        """Cores used per group (`other`: the rest of the machine) and ms/s spent waiting."""
        elapsed = max(later.at - self.at, 1e-9)
        cores = {k: (later.cpu[k] - v) / elapsed for k, v in self.cpu.items()}
        cores["other"] = (later.machine - self.machine) / elapsed - sum(cores.values())
        waits = {k: (later.wait[k] - v) / elapsed * 1000 for k, v in self.wait.items()}
        return {
            "cores": {k: round(v, 2) for k, v in cores.items()},
            "runqueue_wait_ms_per_s": {k: round(v) for k, v in waits.items()},
        }

    def used_s(self, later: CpuSample) -> dict[str, float]:
        """CPU seconds per group between the two samples."""
        return {k: later.cpu[k] - v for k, v in self.cpu.items()}


# -- load generation ---------------------------------------------------------------


@dataclass
class Tally:
    """What one load phase sent and got back."""

    sent: int = 0
    ok: int = 0
    non2xx: int = 0
    errors: int = 0
    timeouts: int = 0
    first_send: float = math.inf
    last_done: float = 0.0
    latencies: list[float] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)  # each latency's start, in order
    statuses: dict[int, int] = field(default_factory=dict)

    def record(self, status: int, started: float, done: float) -> None:
        """Count one answered request."""
        self.latencies.append(done - started)
        self.started_at.append(started)
        self.last_done = max(self.last_done, done)
        if 200 <= status < 300:
            self.ok += 1
        else:
            self.non2xx += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def events_ok(self) -> int:
        """Events in requests answered 2xx."""
        return self.ok * BATCH


@contextlib.asynccontextmanager
async def connected(port: int, n: int) -> AsyncIterator[list[Connection]]:
    """`n` fresh keep-alive connections, closed on the way out."""
    conns = [Connection(HOST, port) for _ in range(n)]
    try:
        await asyncio.gather(*(c.open() for c in conns))
        yield conns
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


REQUEST_TIMEOUT_S = 30.0


async def _send(conn: Connection, request: bytes, tally: Tally, scheduled: float | None) -> None:
    """Send one request and count it; latency runs from `scheduled` when given."""
    started = time.perf_counter()
    tally.first_send = min(tally.first_send, started)
    tally.sent += 1
    try:
        status, _ = await asyncio.wait_for(conn.send(request), REQUEST_TIMEOUT_S)
    except TimeoutError:
        tally.timeouts += 1
        await conn.close()
        return
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        tally.errors += 1
        await conn.close()
        return
    tally.record(status, started if scheduled is None else scheduled, time.perf_counter())


async def run_flat(
    conns: list[Connection], source: RequestSource, seconds: float, tally: Tally
) -> Tally:
    """Every connection sends back to back until `seconds` have passed."""
    deadline = time.perf_counter() + seconds

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            await _send(conn, source.next(), tally, None)

    await asyncio.gather(*(worker(c) for c in conns))
    return tally


async def run_paced(
    conns: list[Connection], requests: list[bytes], rate_rps: float, tally: Tally
) -> Tally:
    """Send `requests` at `rate_rps` (open loop); latency counts from each scheduled time."""
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def dispatcher() -> None:
        start = time.perf_counter() + 0.01
        for i, request in enumerate(requests):
            due = start + i / rate_rps
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((due, request))
        for _ in conns:
            queue.put_nowait(None)

    async def worker(conn: Connection) -> None:
        while (item := await queue.get()) is not None:
            await _send(conn, item[1], tally, item[0])

    await asyncio.gather(dispatcher(), *(worker(c) for c in conns))
    return tally


async def progress(
    label: str,
    tally: Tally,
    backlog: Callable[[], Awaitable[int]] | None,
    stop: asyncio.Event,
    every: float = 1.0,
) -> None:
    """Print a line every second until `stop`: sent, accepted ev/s and events not yet applied."""
    started = last_at = time.perf_counter()
    last_ok = tally.ok
    for tick in itertools.count(1):
        await asyncio.sleep(max(started + tick * every - time.perf_counter(), 0.0))
        if stop.is_set():
            return
        now, ok = time.perf_counter(), tally.ok
        line = (
            f"  [{label}] {now - started:5.1f}s  sent {tally.sent:,} req  "
            f"accepted {(ok - last_ok) * BATCH / (now - last_at):,.0f} ev/s"
        )
        if backlog is not None:
            try:
                line += f"  not yet applied {await asyncio.wait_for(backlog(), every * 0.8):,}"
            except (TimeoutError, OSError, RuntimeError, ValueError):
                line += f"  not yet applied ? (/v1/status > {every * 0.8:g} s)"
        if tally.non2xx or tally.errors or tally.timeouts:
            line += f"  non-2xx {tally.non2xx}  errors {tally.errors}  timeouts {tally.timeouts}"
        log(line)
        last_at, last_ok = now, ok


async def with_progress(
    label: str,
    tally: Tally,
    work: Any,
    backlog: Callable[[], Awaitable[int]] | None = None,
    every: float = 1.0,
) -> Any:
    """Await `work` while printing progress lines every `every` seconds."""
    stop = asyncio.Event()
    reporter = asyncio.create_task(progress(label, tally, backlog, stop, every))
    try:
        return await work
    finally:
        # Python 3.11's wait_for can swallow a cancel that lands as the /v1/status read
        # finishes (it hung a run for 12 minutes): the reporter also stops on the flag.
        stop.set()
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


def summarize(tally: Tally, elapsed: float) -> dict[str, Any]:
    """The figures of one phase."""
    return {
        "requests_sent": tally.sent,
        "requests_2xx": tally.ok,
        "non_2xx": tally.non2xx,
        "non_2xx_by_status": {str(k): v for k, v in tally.statuses.items()},
        "errors": tally.errors,
        "timeouts": tally.timeouts,
        "events_accepted": tally.events_ok,
        "seconds": round(elapsed, 3),
        "accepted_events_s": round(tally.events_ok / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {k: round(v, 2) for k, v in latency_ms(tally.latencies).items()},
    }


# -- the engine --------------------------------------------------------------------


async def engine_totals(port: int) -> dict[str, Any]:
    """Shard counters from /v1/status, summed over shards."""
    status, body = await fetch_json(HOST, port, "/v1/status", headers=ADMIN_HEADERS)
    if status != 200 or not body:
        raise RuntimeError(f"/v1/status answered {status}")
    totals: dict[str, Any] = {
        k: 0
        for k in ("applied", "duplicate", "dropped", "forwarded", "failed", "profiles", "rss_bytes")
    }
    totals["pids"] = []
    totals["cpu_s"] = {}
    totals["ready"] = 0
    for shard in body["shards"]:
        stats = shard.get("stats") or {}
        for name in ("applied", "duplicate", "dropped", "forwarded"):
            totals[name] += stats.get(name, 0)
        totals["failed"] += shard.get("failed_events", 0)
        totals["profiles"] += shard.get("profiles", 0)
        totals["rss_bytes"] += shard.get("rss_bytes", 0)
        totals["ready"] += bool(shard.get("ready"))
        for activity, seconds in (shard.get("cpu_s") or {}).items():
            totals["cpu_s"][activity] = totals["cpu_s"].get(activity, 0.0) + seconds
        if shard.get("pid"):
            totals["pids"].append(shard["pid"])
    totals["processed"] = sum(
        totals[k] for k in ("applied", "duplicate", "dropped", "forwarded", "failed")
    )
    return totals


async def engine_backlog(run: EngineRun, tally: Tally) -> int:
    """Events answered 2xx so far that the shards have not processed yet."""
    totals = await engine_totals(run.port)
    return run.accepted_total + tally.events_ok - totals["processed"]


def shard_cpu_per_event(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Shard CPU µs per event processed between two engine_totals, by activity, in place."""
    events = after["processed"] - before["processed"]
    if events <= 0 or not after.get("cpu_s"):
        return {}
    used = {k: v - before.get("cpu_s", {}).get(k, 0.0) for k, v in after["cpu_s"].items()}
    out = {k: round(v / events * 1e6, 1) for k, v in used.items() if k != "process"}
    if "process" in used:
        out["rest"] = round((used["process"] - sum(used[k] for k in out)) / events * 1e6, 1)
    return out


async def wait_processed(
    port: int, target: int, timeout: float, interval: float = 0.05
) -> tuple[float | None, dict[str, Any]]:
    """Poll /v1/status until shards have processed `target` events: (time seen, totals)."""
    deadline = time.perf_counter() + timeout
    totals: dict[str, Any] = {"processed": 0}
    while True:
        with contextlib.suppress(TimeoutError, OSError, asyncio.IncompleteReadError):
            totals = await asyncio.wait_for(engine_totals(port), REQUEST_TIMEOUT_S)
        now = time.perf_counter()
        if totals["processed"] >= target:
            return now, totals
        if now > deadline:
            return None, totals
        await asyncio.sleep(interval)


@dataclass
class EngineRun:
    """Settings and state of the engine part of the run."""

    port: int
    source: RequestSource
    connections: int
    duration: float
    cpu_groups: dict[str, list[int]]
    accepted_total: int = 0
    redis_url: str = ""


async def redis_commandstats(url: str) -> dict[str, tuple[int, int]]:
    """Redis's own (CPU µs, calls) per command name so far ({} when it cannot be read)."""
    if not url:
        return {}
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    except Exception:
        return {}
    finally:
        await client.aclose()
    return {k.removeprefix("cmdstat_"): (int(v["usec"]), int(v["calls"])) for k, v in stats.items()}


def redis_by_command(before: dict, after: dict, events: int) -> dict[str, dict[str, float]]:
    """Per command, Redis CPU µs per event and per call between two commandstats readings.

    Per call shows how long one command keeps Redis (single-threaded) from
    answering the API's XADDs: a long one is a latency spike for ingest.
    """
    if not before or not events:
        return {}
    used = {
        k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1])
        for k, v in after.items()
    }
    top = sorted(((v, k) for k, v in used.items() if v[0] > 0), reverse=True)[:5]
    return {
        k: {"per_event": round(us / events, 2), "per_call": round(us / max(calls, 1), 1)}
        for (us, calls), k in top
    }


def slowest_seconds(
    tally: Tally, since: float, rewrites: set[int] | None = None, n: int = 3
) -> list[dict[str, Any]]:
    """The `n` seconds of a phase with the slowest answer, each with how many answers
    missed the p99 target and whether Redis was rewriting its AOF then (`rewrites`:
    seconds since `since`)."""
    by_second: dict[int, list[float]] = {}
    for started, latency in zip(tally.started_at, tally.latencies, strict=True):
        by_second.setdefault(int(started - since), []).append(latency)
    out = []
    for second, values in by_second.items():
        values.sort()
        out.append(
            {
                "second": second,
                "requests": len(values),
                "over_target": sum(1 for v in values if v * 1e3 > TARGET_P99_MS),
                "max_ms": round(values[-1] * 1e3, 1),
                "aof_rewrite": second in (rewrites or set()),
            }
        )
    return sorted(out, key=lambda w: -w["max_ms"])[:n]


async def watch_rewrites(url: str, since: float, stop: asyncio.Event) -> set[int]:
    """Seconds since `since` in which Redis was rewriting its AOF (polled every 100 ms)."""
    seconds: set[int] = set()
    if not url:
        return seconds
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                if (await client.info("persistence")).get("aof_rewrite_in_progress"):
                    seconds.add(int(time.perf_counter() - since))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    finally:
        await client.aclose()
    return seconds


async def warm_up(run: EngineRun) -> None:
    """One request per connection, then wait until applied (fills pools, imports code)."""
    async with connected(run.port, run.connections) as conns:
        tally = await run_paced(conns, run.source.take(len(conns)), 1000.0, Tally())
    run.accepted_total += tally.events_ok
    seen, _ = await wait_processed(run.port, run.accepted_total, 60.0)
    if seen is None:
        raise RuntimeError("warm-up events were not applied within 60 s")


async def flat_phase(run: EngineRun) -> dict[str, Any]:
    """Flat out for the duration, then wait until everything accepted is applied."""
    tally = Tally()
    commands = await redis_commandstats(run.redis_url)
    shards_before = await engine_totals(run.port)
    async with connected(run.port, run.connections) as conns:
        cpu_before = CpuSample.take(run.cpu_groups)
        await with_progress(
            "nudge flat-out",
            tally,
            run_flat(conns, run.source, run.duration, tally),
            lambda: engine_backlog(run, tally),
        )
    cpu = cpu_before.until(CpuSample.take(run.cpu_groups))
    run.accepted_total += tally.events_ok
    seen, totals = await wait_processed(run.port, run.accepted_total, max(120.0, run.duration * 6))
    out = summarize(tally, tally.last_done - tally.first_send)
    out["cpu"] = cpu
    # The shards go on applying through the drain: count their CPU until it ends.
    drained = cpu_before.used_s(CpuSample.take(run.cpu_groups))
    out["cpu_us_per_event_drained"] = {
        k: round(v / max(tally.events_ok, 1) * 1e6, 1) for k, v in drained.items()
    }
    out["shard_cpu_us_per_event"] = shard_cpu_per_event(shards_before, totals)
    out["redis_commands"] = redis_by_command(
        commands, await redis_commandstats(run.redis_url), tally.events_ok
    )
    if seen is None:
        out["applied_events_s"] = None
        out["drain_s"] = None
        done, wanted = totals["processed"], run.accepted_total
        log(f"  shards did not catch up: processed {done:,} of {wanted:,}")
    else:
        out["applied_events_s"] = round(tally.events_ok / (seen - tally.first_send), 1)
        out["drain_s"] = round(seen - tally.last_done, 3)
    return out


async def paced_phase(run: EngineRun, rate_events: float) -> dict[str, Any]:
    """Open-loop load at `rate_events` events/s for the duration; latency percentiles."""
    rate_rps = max(rate_events / BATCH, 1.0)
    requests = run.source.take(max(int(rate_rps * run.duration), 1))
    tally = Tally()
    commands = await redis_commandstats(run.redis_url)
    shards_before = await engine_totals(run.port)
    async with connected(run.port, run.connections) as conns:
        cpu_before = CpuSample.take(run.cpu_groups)
        since, stop = time.perf_counter(), asyncio.Event()
        watcher = asyncio.create_task(watch_rewrites(run.redis_url, since, stop))
        try:
            await with_progress(
                f"nudge paced {rate_rps * BATCH:,.0f} ev/s",
                tally,
                run_paced(conns, requests, rate_rps, tally),
                lambda: engine_backlog(run, tally),
            )
        finally:
            stop.set()
            rewrites = await watcher
    cpu = cpu_before.until(CpuSample.take(run.cpu_groups))
    run.accepted_total += tally.events_ok
    seen, totals = await wait_processed(run.port, run.accepted_total, max(120.0, run.duration * 6))
    out = summarize(tally, tally.last_done - tally.first_send)
    out["shard_cpu_us_per_event"] = shard_cpu_per_event(shards_before, totals)
    out["target_events_s"] = round(rate_rps * BATCH, 1)
    out["cpu"] = cpu
    out["redis_commands"] = redis_by_command(
        commands, await redis_commandstats(run.redis_url), tally.events_ok
    )
    out["drain_s"] = None if seen is None else round(seen - tally.last_done, 3)
    out["slowest_seconds"] = slowest_seconds(tally, since, rewrites)
    out["aof_rewrite_seconds"] = sorted(rewrites)
    return out


async def engine_phases(run: EngineRun, server: Server, redis_pid_file: Path) -> dict[str, Any]:
    """Warm up, flat-out, paced; then check the exactly-once promise."""
    before = await engine_totals(run.port)
    redis_pid = int(redis_pid_file.read_text().strip()) if redis_pid_file.exists() else 0
    run.cpu_groups = {
        "api": [server.pid],
        "shards": before["pids"],
        "redis": [redis_pid] if redis_pid else [],
        "ray_system": [p for p in child_pids(server.pid) if p != redis_pid],
        "loadgen": [os.getpid()],
    }
    await warm_up(run)
    log(f"  warm-up done ({run.accepted_total:,} events); flat out for {run.duration:g} s")
    flat = await flat_phase(run)
    rate = flat["applied_events_s"] or flat["accepted_events_s"]
    log(f"  flat-out done; paced at half the applied rate: {rate / 2:,.0f} ev/s")
    paced = await paced_phase(run, rate / 2)
    after = await engine_totals(run.port)
    return {
        "flat": flat,
        "paced": paced,
        "promise": promise_check(run.accepted_total, after),
        "live_memory": {
            "profiles": after["profiles"],
            "shard_rss_bytes": after["rss_bytes"],
            "shard_rss_growth_per_profile": round(
                (after["rss_bytes"] - before["rss_bytes"]) / max(after["profiles"], 1), 1
            ),
        },
    }


def promise_check(accepted: int, totals: dict[str, Any]) -> dict[str, Any]:
    """Every 2xx event applied exactly once: applied == accepted, nothing else counted."""
    others = {k: totals[k] for k in ("duplicate", "dropped", "forwarded", "failed")}
    return {
        "accepted": accepted,
        "applied": totals["applied"],
        **others,
        "ok": totals["applied"] == accepted and not any(others.values()),
    }


def engine_env(args: argparse.Namespace) -> dict[str, str]:
    """The engine settings this run overrides, as NUDGE_* variables."""
    env = {}
    if args.checkpoint_ms is not None:
        env["NUDGE_CHECKPOINT_INTERVAL_MS"] = str(args.checkpoint_ms)
    if args.checkpoint_events is not None:
        env["NUDGE_CHECKPOINT_EVENTS"] = str(args.checkpoint_events)
    return env


def bench_engine(
    runner: asyncio.Runner, tmp: Path, source: RequestSource, args: argparse.Namespace
) -> dict[str, Any]:
    """Start `nudge serve`, run its phases, stop it with SIGINT."""
    port = free_port()
    data_dir = tmp / "engine-data"
    argv = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port)]
    argv += ["--data-dir", str(data_dir), "--shards", str(args.shards)]
    server = Server("nudge serve", argv, cwd=tmp, log_path=tmp / "engine.log", env=engine_env(args))
    started = time.perf_counter()
    server.start()
    try:
        try:
            runner.run(wait_http(HOST, port, "/healthz", timeout=180.0, alive=server.alive))
        except (RuntimeError, TimeoutError):
            log(server.log_tail())
            raise
        startup = time.perf_counter() - started
        log(f"nudge serve healthy on :{port} after {startup:.1f} s ({args.shards} shards)")
        sock = data_dir / "redis" / "redis.sock"
        run = EngineRun(port, source, args.connections, args.duration, {})
        run.redis_url = f"unix://{sock}" if sock.exists() else ""
        result = runner.run(engine_phases(run, server, data_dir / "redis" / "redis.pid"))
        result["startup_s"] = round(startup, 2)
    finally:
        stop_s = server.stop()
    result["stop_s"] = round(stop_s, 2)
    result["exit_code"] = server.proc.returncode if server.proc else None
    phases = (result["flat"], result["paced"])
    if not result["promise"]["ok"] or any(
        ph[k] for ph in phases for k in ("non_2xx", "errors", "timeouts")
    ):
        result["engine_log_tail"] = server.log_tail(40)
        log("something went wrong; the engine's log ends with:\n" + result["engine_log_tail"])
    log(f"nudge serve stopped in {stop_s:.1f} s (exit code {result['exit_code']})")
    return result


# -- baselines ---------------------------------------------------------------------


def bare_app() -> Any:
    """Baseline ASGI app (uvicorn --factory): read and parse the batch body, answer success."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def batch(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(b'{"success":true}', media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[Route("/v1/batch", batch, methods=["POST"]), Route("/healthz", healthz)]
    )


async def _bare_load(port: int, source: RequestSource, connections: int, seconds: float) -> Tally:
    """Flat-out load against the bare app."""
    async with connected(port, connections) as conns:
        tally = Tally()
        await run_paced(conns, source.take(connections), 1000.0, Tally())  # warm-up
        return await with_progress("bare starlette", tally, run_flat(conns, source, seconds, tally))


def bench_bare(
    runner: asyncio.Runner, tmp: Path, source: RequestSource, args: argparse.Namespace
) -> dict[str, Any]:
    """Events/s through HTTP alone: bare Starlette under uvicorn, one worker."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "benchmarks.ingest:bare_app", "--factory"]
    argv += ["--host", HOST, "--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = Server("bare uvicorn", argv, cwd=tmp, log_path=tmp / "bare.log").start()
    try:
        runner.run(wait_http(HOST, port, "/healthz", timeout=60.0, alive=server.alive))
        tally = runner.run(_bare_load(port, source, args.connections, args.baseline_seconds))
    finally:
        server.stop()
    out = summarize(tally, tally.last_done - tally.first_send)
    out["events_s"] = out["accepted_events_s"]
    return out


def stream_payloads(catalog: Catalog, n: int = 32) -> list[bytes]:
    """Stream entries as the API writes them: JSON lists of 100 normalized events."""
    from engine.events import normalize_batch

    rng = random.Random(7)
    now = time.time()
    out = []
    for k in range(n):
        when = datetime.now(UTC).isoformat()
        batch = [shopper_message(rng, catalog, f"x-{k}-{i}", when) for i in range(BATCH)]
        accepted, _ = normalize_batch({"batch": batch}, received_at=now, body_bytes=0)
        out.append(orjson.dumps(accepted))
    return out


def bench_redis(
    tmp: Path, payloads: list[bytes], seconds: float, depth: int = 50
) -> dict[str, Any]:
    """Events/s of redis-py XADD, one 100-event entry per command, pipelined."""
    import redis

    from engine.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp / "redis-baseline")
    url = server.start()
    client = redis.Redis.from_url(url)
    try:
        key, sent = "bench:{s0}:events", 0
        client.xadd(key, {"e": payloads[0]})
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            with client.pipeline(transaction=False) as pipe:
                for i in range(depth):
                    pipe.xadd(key, {"e": payloads[(sent + i) % len(payloads)]})
                pipe.execute()
            sent += depth
        elapsed = time.perf_counter() - started
    finally:
        client.close()
        server.stop()
    log(f"  [redis XADD] {sent:,} entries in {elapsed:.1f} s")
    return {
        "entries": sent,
        "seconds": round(elapsed, 3),
        "entry_bytes": sum(map(len, payloads)) // len(payloads),
        "pipeline_depth": depth,
        "events_s": round(sent * BATCH / elapsed, 1),
    }


class _Sink:
    """The trivial async actor of the Ray baseline."""

    async def take(self, event: dict) -> None:
        """Accept one event and do nothing with it."""
        return None


def bench_ray(events: list[dict], seconds: float, window: int = 1000) -> dict[str, Any]:
    """Events/s with one Ray actor call per event, `window` calls in flight."""
    import ray

    started_init = time.perf_counter()
    ray.init(
        address="local",  # never join another cluster that happens to run here
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        sink = ray.remote(_Sink).remote()
        ray.get(sink.take.remote(events[0]))
        init_s = time.perf_counter() - started_init
        calls, started = 0, time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            refs = [sink.take.remote(events[(calls + i) % len(events)]) for i in range(window)]
            ray.get(refs)
            calls += window
        elapsed = time.perf_counter() - started
    finally:
        ray.shutdown()
    log(f"  [ray actor call per event] {calls:,} calls in {elapsed:.1f} s")
    return {
        "calls": calls,
        "seconds": round(elapsed, 3),
        "in_flight": window,
        "ray_init_s": round(init_s, 2),
        "events_s": round(calls / elapsed, 1),
    }


# -- memory per profile ------------------------------------------------------------------


def profile_histories(catalog: Catalog, n_profiles: int, seed: int = 11) -> tuple[list[bytes], int]:
    """Stream entries (100 normalized events each) giving `n_profiles` shoppers a history.

    Histories follow a heavy-tailed length (median ~8, mean ~17 events) over the
    last 30 days, in time order, as the stream would deliver them.
    """
    from engine.events import normalize

    rng = random.Random(seed)
    now = time.time()
    events = []
    for u in range(n_profiles):
        user = f"mem-user-{u:07d}"
        for k in range(min(int(rng.paretovariate(1.3) * 5), 300)):
            ts = now - rng.random() * 30 * 86400
            name = rng.choices([n for n, _ in _EVENT_MIX], [w for _, w in _EVENT_MIX])[0]
            msg = {
                "type": "track",
                "event": name,
                "userId": user,
                "messageId": f"m-{u:07d}-{k:04d}-{rng.getrandbits(32):08x}",
                "properties": shopper_properties(rng, catalog, name),
                "context": _LIBRARY,
            }
            events.append(normalize(msg, kind=None, received_at=ts))
    events.sort(key=lambda e: e["ts"])
    entries = [orjson.dumps(events[i : i + BATCH]) for i in range(0, len(events), BATCH)]
    return entries, len(events)


def _starter_rules() -> tuple[tuple[str, str], ...]:
    """The rules `nudge serve` runs with no config file (none if this engine has no rules)."""
    try:
        from engine.rules.files import STARTER
    except ImportError:
        return ()
    return ((STARTER.read_text(encoding="utf-8"), str(STARTER)),)


def shard_partition() -> Any:
    """An empty Partition built exactly as a lone shard builds its own (limits, rules)."""
    from actors.shard import ShardActor
    from engine.config import EngineConfig

    rules = _starter_rules()
    extra = {"rules": rules} if rules else {}
    shard = ShardActor(0, 1, EngineConfig(), "redis://unused", autostart=False, **extra)
    return shard.partition


def replay_history(partition: Any, entries: list[bytes], checkpoint_every: int = 50) -> list[int]:
    """Replay entries as a shard would (timers, checkpoints): each profile's checkpoint size."""
    sizes: dict[str, int] = {}
    tick = getattr(partition, "tick", None)
    for i, entry in enumerate(entries):
        events = orjson.loads(entry)  # fresh objects per entry, as the shard decodes them
        for event in events:
            partition.apply(event)
        if tick is not None:
            tick(events[-1]["ts"])
        if i % checkpoint_every == checkpoint_every - 1 or i == len(entries) - 1:
            sizes.update((cid, len(b)) for cid, b in partition.take_changes().profiles.items())
    return sorted(sizes.values())


def measure_memory(catalog: Catalog, n_profiles: int) -> dict[str, Any]:
    """Bytes per live profile (tracemalloc over a shard's Partition) and checkpoint bytes."""
    entries, n_events = profile_histories(catalog, n_profiles)
    partition = shard_partition()  # imports and rule compilation stay out of the count
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        sizes = replay_history(partition, entries)
        apply_s = time.perf_counter() - started
        total, p99 = sum(sizes), sizes[int(len(sizes) * 0.99)] if sizes else 0
        del sizes
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        for profile in partition.profiles.values():
            profile.seen = {}
        gc.collect()
        seen = used - (tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    profiles = len(partition.profiles)
    return {
        "profiles": profiles,
        "rules": "starter" if _starter_rules() else "none",
        "events": n_events,
        "events_per_profile": round(n_events / profiles, 1),
        "bytes_per_profile": round(used / profiles, 1),
        "dedupe_ids_bytes_per_profile": round(seen / profiles, 1),
        "checkpoint_bytes_per_profile": round(total / profiles, 1),
        "checkpoint_bytes_p99": p99,
        "stream_bytes_per_event": round(sum(map(len, entries)) / n_events, 1),
        "apply_events_s_under_tracemalloc": round(n_events / apply_s, 1),
    }


# -- report ------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "") -> str:
    """A number with thousands separators (or n/a)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:,.2f}{unit}"
    return f"{value:,.0f}{unit}"


def _verdict(ok: bool | None) -> str:
    """PASS, MISS or n/a."""
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def report_lines(results: dict[str, Any]) -> list[str]:
    """The final table as lines of text."""
    engine, cfg = results["engine"], results["config"]
    flat, paced, promise = engine["flat"], engine["paced"], engine["promise"]
    applied = flat["applied_events_s"]
    fl, pl = flat["latency_ms"], paced["latency_ms"]
    rows: list[tuple[str, str, str]] = [
        ("flat-out accepted (2xx)", _fmt(flat["accepted_events_s"], " ev/s"), ""),
        (
            "flat-out applied end to end",
            _fmt(applied, " ev/s"),
            f">= {TARGET_APPLIED_EVENTS_S:,.0f} ev/s  "
            + _verdict(None if applied is None else applied >= TARGET_APPLIED_EVENTS_S),
        ),
        ("  drain after last ack", _fmt(flat["drain_s"], " s"), ""),
        ("  latency p50 / p99", f"{_fmt(fl['p50'])} / {_fmt(fl['p99'])} ms", ""),
        ("  CPU cores used", "", _cores(flat["cpu"]["cores"])),
        (
            "  CPU µs per event, load only",
            "",
            _per_event(flat["cpu"]["cores"], flat["accepted_events_s"]),
        ),
        ("  CPU µs per event, through the drain", "", _drained(flat)),
        ("  shard CPU µs per event, in place", "", _activities(flat)),
        ("  waiting for a CPU, ms per s", "", _waits(flat["cpu"]["runqueue_wait_ms_per_s"])),
        ("  Redis µs per event (per call), top", "", _commands(flat)),
        (
            "paced rate achieved",
            _fmt(paced["accepted_events_s"], " ev/s"),
            f"asked {paced['target_events_s']:,.0f}",
        ),
        (
            "  latency p50 / p99 / p99.9 (from schedule)",
            f"{_fmt(pl['p50'])} / {_fmt(pl['p99'])} / {_fmt(pl['p99.9'])} ms",
            f"p99 < {TARGET_P99_MS:g} ms  " + _verdict(pl["p99"] < TARGET_P99_MS),
        ),
        ("  CPU cores used", "", _cores(paced["cpu"]["cores"])),
        ("  CPU µs per event", "", _per_event(paced["cpu"]["cores"], paced["accepted_events_s"])),
        ("  shard CPU µs per event, in place", "", _activities(paced)),
        ("  waiting for a CPU, ms per s", "", _waits(paced["cpu"]["runqueue_wait_ms_per_s"])),
        ("  Redis µs per event (per call), top", "", _commands(paced)),
        (f"  slowest seconds: max ms, answers > {TARGET_P99_MS:g} ms", "", _slowest(paced)),
        (
            "applied == accepted",
            f"{promise['applied']:,} == {promise['accepted']:,}",
            "promise " + ("KEPT" if promise["ok"] else "BROKEN"),
        ),
        (
            "  duplicate/dropped/forwarded/failed",
            "/".join(str(promise[k]) for k in ("duplicate", "dropped", "forwarded", "failed")),
            "",
        ),
        (
            "non-2xx / errors / timeouts",
            "/".join(str(flat[k] + paced[k]) for k in ("non_2xx", "errors", "timeouts")),
            "",
        ),
    ]
    rows += _memory_rows(results)
    rows += _baseline_rows(results, applied)
    width = max(len(r[0]) for r in rows) + 2
    vwidth = max(len(r[1]) for r in rows) + 2
    head = (
        f"Nudge ingest — {os.cpu_count()} cores, {cfg['shards']} shards, "
        f"{cfg['connections']} connections, {BATCH} events/request, {cfg['duration']:g} s phases, "
        f"{cfg.get('templates', 256):,} distinct bodies"
    )
    if cfg.get("checkpoint_ms") is not None or cfg.get("checkpoint_events") is not None:
        every_ms = cfg.get("checkpoint_ms") or EngineConfig.checkpoint_interval_ms
        every_events = cfg.get("checkpoint_events") or EngineConfig.checkpoint_events
        head += f", checkpoints every {every_ms:,} ms or {every_events:,} events"
    lines = ["", head, f"code {results.get('code', '?')}", "-" * len(head)]
    lines += [f"{a:<{width}}{b:>{vwidth}}  {c}".rstrip() for a, b, c in rows]
    lines.append(
        "(CPU: other = whatever else ran on the machine, not Nudge nor the load generator)"
    )
    return lines


def _commands(phase: dict[str, Any]) -> str:
    used = phase.get("redis_commands") or {}
    return (
        " ".join(f"{k} {v['per_event']:g} ({v['per_call']:g}/call)" for k, v in used.items())
        or "n/a"
    )


def _slowest(phase: dict[str, Any]) -> str:
    """The slowest seconds of a phase, marked where Redis was rewriting its AOF."""
    windows = phase.get("slowest_seconds") or []
    text = "  ".join(
        f"s{w['second']}: {w['max_ms']:g}, {w['over_target']}"
        + (" AOF rewrite" if w["aof_rewrite"] else "")
        for w in windows
    )
    rewriting = phase.get("aof_rewrite_seconds") or []
    return f"{text}; AOF rewriting in {len(rewriting)} s of the phase"


def _cores(cpu: dict[str, float]) -> str:
    """CPU use per component, compactly."""
    names = ("api", "shards", "redis", "ray_system", "loadgen", "other")
    return " ".join(f"{n.partition('_')[0]} {cpu.get(n, 0):.2f}" for n in names)


def _per_event(cpu: dict[str, float], events_s: float | None) -> str:
    """CPU time per event of the engine's parts: steadier than rates on a shared machine."""
    if not events_s:
        return "n/a"
    names = ("api", "shards", "redis")
    return " ".join(f"{n} {cpu.get(n, 0) / events_s * 1e6:.1f}" for n in names)


def _activities(phase: dict[str, Any]) -> str:
    """A phase's shard CPU per event by activity, as the shards timed it themselves."""
    used = phase.get("shard_cpu_us_per_event") or {}
    return "  ".join(f"{k} {v:g}" for k, v in used.items()) or "-"


def _drained(phase: dict[str, Any]) -> str:
    used = phase.get("cpu_us_per_event_drained") or {}
    return " ".join(f"{n} {used[n]:.1f}" for n in ("api", "shards", "redis") if n in used) or "n/a"


def _waits(waits: dict[str, float]) -> str:
    """Run-queue wait per component (summed over its threads), compactly."""
    names = ("api", "shards", "redis")
    return " ".join(f"{n} {waits.get(n, 0):.0f}" for n in names)


def _memory_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows about memory per profile."""
    mem, live = results.get("memory"), results["engine"]["live_memory"]
    rows = [
        (
            "live shards: profiles, RSS growth/profile",
            f"{live['profiles']:,}, {_fmt(live['shard_rss_growth_per_profile'], ' B')}",
            "noisy",
        )
    ]
    if mem:
        rows += [
            (
                "memory per profile (tracemalloc)",
                _fmt(mem["bytes_per_profile"], " B"),
                f"{mem['profiles']:,} profiles, {mem['events_per_profile']:g} events each, "
                f"{mem['rules']} rules",
            ),
            ("  of which dedupe messageIds", _fmt(mem["dedupe_ids_bytes_per_profile"], " B"), ""),
            (
                "checkpoint bytes per profile",
                _fmt(mem["checkpoint_bytes_per_profile"], " B"),
                f"p99 {mem['checkpoint_bytes_p99']:,} B",
            ),
        ]
    return rows


def _baseline_rows(results: dict[str, Any], applied: float | None) -> list[tuple[str, str, str]]:
    """Rows of the baselines, each with Nudge's applied rate as a ratio of it."""
    names = {
        "bare_starlette": "baseline: bare Starlette parse",
        "redis_xadd": "baseline: redis-py XADD 100/entry",
        "ray_call_per_event": "baseline: Ray actor call/event",
    }
    rows = []
    for key, label in names.items():
        figures = results.get("baselines", {}).get(key)
        if not figures:
            continue
        rate = figures["events_s"]
        ratio = f"Nudge/baseline {applied / rate:.3g}x" if applied and rate else ""
        rows.append((label, _fmt(rate, " ev/s"), ratio))
    return rows


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest", description="Nudge ingest benchmark with baselines"
    )
    parser.add_argument("--shards", type=int, default=4, help="engine shards (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--users", type=int, default=5000, help="distinct userIds")
    parser.add_argument(
        "--templates", type=int, default=4096, help="distinct request bodies (default 4096)"
    )
    parser.add_argument("--profiles", type=int, default=5000, help="profiles for tracemalloc")
    parser.add_argument("--baseline-seconds", type=float, default=3.0, help="seconds per baseline")
    parser.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--seed", type=int, default=1, help="workload random seed")
    parser.add_argument(
        "--checkpoint-ms",
        type=int,
        metavar="MS",
        help=f"the engine's checkpoint_interval_ms (default {EngineConfig.checkpoint_interval_ms})",
    )
    parser.add_argument(
        "--checkpoint-events",
        type=int,
        metavar="N",
        help=f"the engine's checkpoint_events (default {EngineConfig.checkpoint_events})",
    )
    parser.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    return parser.parse_args(argv)


def code_revision() -> str:
    """The git commit of the code under test, marked when files differ from it (read-only)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes" if changed else head


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop (already installed with uvicorn[standard]) if present, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every measurement, in an order that keeps them from overlapping."""
    rng = random.Random(args.seed)
    catalog = Catalog.build(rng, args.users)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    results: dict[str, Any] = {"config": config, "cpus": os.cpu_count(), "baselines": {}}
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"load average before the run: {load} on {os.cpu_count()} cores")
    results["loadavg_before"] = os.getloadavg()
    results["code"] = code_revision()
    log(f"code under test: {results['code']}")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        source = make_source(rng, catalog, HOST, args.templates)
        results["engine"] = bench_engine(runner, tmp, source, args)
        if not args.no_baselines:
            log(f"baseline: bare Starlette + uvicorn, {args.baseline_seconds:g} s")
            results["baselines"]["bare_starlette"] = bench_bare(runner, tmp, source, args)
    if not args.no_baselines:
        log(f"baseline: redis-py XADD, {args.baseline_seconds:g} s")
        payloads = stream_payloads(catalog)
        results["baselines"]["redis_xadd"] = bench_redis(tmp, payloads, args.baseline_seconds)
        log(f"baseline: one Ray actor call per event, {args.baseline_seconds:g} s (+ ray.init)")
        events = [e for p in payloads[:4] for e in orjson.loads(p)]
        results["baselines"]["ray_call_per_event"] = bench_ray(events, args.baseline_seconds)
    if not args.no_memory:
        log(f"memory: {args.profiles:,} profiles through Partition.apply under tracemalloc")
        results["memory"] = measure_memory(catalog, args.profiles)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON if asked."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="nudge-bench-"))
    started = time.perf_counter()
    try:
        results = run_all(args, tmp)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    for line in report_lines(results):
        print(line)
    print(f"(whole run {results['total_s']:.0f} s)")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

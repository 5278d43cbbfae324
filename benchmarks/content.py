"""Content endpoint benchmark, beside baselines measured in the same run.

Run:  python -m benchmarks.content [--duration 8] [--rate 5000] [--json out.json]

1. Starts an embedded Redis, seeds --customers shoppers (identify + browsing +
   cart events) into the shards' streams, and starts three servers:
   - upstream: two external sources (/fast answers after --upstream-ms, /hang never);
   - nudge: a local Ray with the shard actors and the content routes under uvicorn;
   - bare: a bare Starlette JSON endpoint (baseline).
2. Content, normal: blocks profile, cart, recommendations and two external
   sources answering in --upstream-ms: `offers` (per loyalty tier, so well
   cached) and `loyalty` (per customer, TTL 10 s). Requests walk the customers
   in random order, each asked --passes times in a row, as an ESP rendering
   the HTML and text parts of one recipient's email does. Flat out with
   --connections keep-alive connections, then paced (open loop, latency from
   each request's scheduled time) at --rate or --pace-fraction (0.6) of the flat-out
   rate, whichever is lower: past capacity, latency only measures a growing queue.
3. The same with `loyalty` pointing at a hanging upstream, paced at that rate, over
   enough connections for each answer to hold one for the whole deadline.
4. Baselines, flat out with the same load generator: the bare Starlette JSON
   endpoint, and one un-coalesced Ray call per request (get_profiles on the
   owning shard) behind the same uvicorn.

Prints req/s, p50/p99/p99.9, the fallback rate and upstream calls, with the
targets (>= 5,000 req/s with p99 < 25 ms; hanging: p99 <= deadline + 15 ms
and zero non-200 answers). Identical requests in flight together share one
answer (the service coalesces them), which the --passes workload exercises.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
CONTENT_AUTH = "Bearer dev-content-key"
BLOCKS = "profile,cart,recommendations,offers,loyalty"
HANG_BLOCKS = "profile,cart,recommendations,offers,loyalty_hang"
DEADLINE_MS = 200
TARGET_RPS, TARGET_P99_MS, HANG_MARGIN_MS = 5000.0, 25.0, 15.0
_TIERS = ("bronze", "silver", "gold", "platinum")
_CATEGORIES = ("Shoes", "Bags", "Jackets", "Shirts", "Watches", "Beauty", "Home", "Toys")


def log(message: str) -> None:
    """One progress line, flushed at once."""
    print(message, flush=True)


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


# -- role: upstream (the external sources) -----------------------------------------


def run_upstream(port: int, delay_ms: float) -> None:
    """Raw HTTP/1.1 keep-alive server: /fast after `delay_ms`, /hang never, /stats counts."""
    counts: Counter[str] = Counter()

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                kind = target.split(b"/", 2)[1].decode()
                counts[kind] += 1
                if kind == "hang":
                    continue
                if kind == "stats":
                    self._reply(orjson.dumps(counts))
                    continue
                customer = target.rpartition(b"=")[2].decode()
                body = orjson.dumps(
                    {"data": {"title": f"Hello {customer}", "points": len(customer) * 10}}
                )
                asyncio.get_running_loop().call_later(delay_ms / 1000.0, self._reply, body)

        def _reply(self, body: bytes) -> None:
            if not self.transport.is_closing():
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Upstream, HOST, port, backlog=4096)
        async with server:
            await server.serve_forever()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


# -- role: bare Starlette baseline ----------------------------------------------------


def run_bare(port: int) -> None:
    """A bare Starlette + uvicorn JSON GET endpoint."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = orjson.dumps({"customer_id": "x", "blocks": {"hello": {"data": "world"}}})

    async def hello(request: Any) -> Response:
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route("/bare/{customer_id}", hello)])
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


# -- role: the Nudge content server -----------------------------------------------------


def content_table(upstream: int, args: argparse.Namespace) -> dict[str, Any]:
    """The [content] table of the benchmark: two sources, and the hanging twin of one."""
    base = f"http://{HOST}:{upstream}"
    common = {
        "select": "data",
        "timeout_ms": 1000,  # longer than the deadline: the deadline is what cuts
        "html": "<p>{title}</p>",
        "fallback_html": "<p>Welcome back</p>",
        "max_inflight": 64,
    }
    return {
        "deadline_ms": DEADLINE_MS,
        "product_url": "https://shop.example/p/{product_id}",
        "checkout_url": "https://shop.example/cart?c={cart_id}",
        "source": [
            {"name": "offers", "url": base + "/fast/offers?tier={traits.tier}", **common,
             "ttl_s": 60, "stale_s": 300},
            {"name": "loyalty", "url": base + "/fast/loyalty?c={customer_id}", **common,
             "ttl_s": 10, "stale_s": 0},
            {"name": "loyalty_hang", "url": base + "/hang/loyalty?c={customer_id}", **common,
             "ttl_s": 10, "stale_s": 0},
        ],
    }  # fmt: skip


def _settings(args: argparse.Namespace) -> Any:
    from engine.config import EngineConfig

    return EngineConfig(shards=args.shards, ray_namespace="bench-content")


def build_app(args: argparse.Namespace) -> Any:
    """The content routes (plus the Ray baseline and a stats listener) of one API process."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from actors.cluster import shard_client
    from engine.config import AuthConfig
    from engine.content import (
        ContentService,
        content_config_from_mapping,
        content_first,
        content_routes,
    )
    from engine.heap import keep_heap_quiet
    from engine.routing import shard_for

    settings = _settings(args)
    config = content_config_from_mapping(content_table(args.upstream_port, args))
    service = ContentService(config, redis_url=args.redis_url)
    held: dict[str, Any] = {}
    handled: list[float] = []  # seconds from handler start to last body byte, per answer

    async def stats() -> dict[str, Any]:
        statuses = await held["shards"].statuses()
        out = {
            "pid": os.getpid(),
            "applied": sum((s or {}).get("stats", {}).get("applied", 0) for s in statuses),
            "stats": dict(service.stats),
            "cache": dict(service.cache.stats),
            "reads": dict(held["shards"].stats),
            "handled": list(handled),
        }
        handled.clear()
        return out

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        held["shards"] = shard_client(settings)
        await service.start()
        # Each API process answers its own figures on a private port (the shared
        # port reaches one worker at random): the benchmark asks every one.
        listener = await serve_stats(stats)
        port = listener.sockets[0].getsockname()[1]
        Path(args.stats_dir, f"{os.getpid()}.port").write_text(str(port))
        # as `nudge serve` runs its API: no full-collection pauses (engine.heap)
        keeper = asyncio.create_task(keep_heap_quiet())
        yield
        keeper.cancel()
        listener.close()
        await listener.wait_closed()
        await service.close()

    async def ray_baseline(request: Any) -> Response:
        customer = request.path_params["customer_id"]
        client = held["shards"]
        found = await client.handles[shard_for(customer, client.shards)].get_profiles.remote(
            [customer]
        )
        return Response(orjson.dumps(found[0]), media_type="application/json")

    def timed(app: Any) -> Any:
        async def wrapper(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].startswith("/v1/content/"):
                return await app(scope, receive, send)
            started = time.perf_counter()
            await app(scope, receive, send)
            handled.append(time.perf_counter() - started)

        return wrapper

    routes = content_routes(
        config, auth=AuthConfig(), service=service, shards=lambda: held["shards"]
    )
    routes.append(Route("/baseline/ray/{customer_id}", ray_baseline))
    return timed(content_first(Starlette(routes=routes, lifespan=lifespan), routes))


async def serve_stats(stats: Any) -> Any:
    """A loopback listener answering any GET with `await stats()` as JSON, then closing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            body = orjson.dumps(await stats())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, HOST, 0)


def worker_app() -> Any:
    """App factory of each uvicorn worker (--workers > 1): joins the benchmark's Ray."""
    from actors.cluster import start_ray

    args = argparse.Namespace(**orjson.loads(os.environ["NUDGE_BENCH_SERVER"]))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    start_ray(args.ray_address, namespace=_settings(args).ray_namespace)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return build_app(args)


def run_server(args: argparse.Namespace) -> None:
    """Local Ray with the shards; the content routes (plus the Ray baseline) on uvicorn,
    in this process or, with --workers N, in N worker processes as `nudge serve` runs them."""
    import uvicorn

    from actors.cluster import ensure_shards, start_ray, stop_shards, wait_ready

    settings = _settings(args)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    gcs = start_ray("", namespace=settings.ray_namespace, num_cpus=2)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    handles = ensure_shards(settings, args.redis_url)
    wait_ready(handles)
    options = {"host": HOST, "port": args.port, "log_level": "warning", "access_log": False}
    try:
        if args.workers > 1:
            os.environ["NUDGE_BENCH_SERVER"] = orjson.dumps(
                {**vars(args), "ray_address": gcs}
            ).decode()
            uvicorn.run("benchmarks.content:worker_app", factory=True, workers=args.workers,
                        **options)  # fmt: skip
        else:
            uvicorn.run(build_app(args), lifespan="on", **options)
    finally:
        stop_shards(handles)
        import ray

        ray.shutdown()


# -- seeding ------------------------------------------------------------------------------


def shopper_events(rng: random.Random, customer: str, now: float) -> list[dict]:
    """A shopper's history: identify, a few views, sometimes a cart, sometimes an order."""
    msgs: list[dict] = [
        {"type": "identify", "userId": customer,
         "traits": {"first_name": f"Ann{rng.randrange(1000)}", "tier": rng.choice(_TIERS),
                    "email": f"{customer}@example.com"}},
    ]  # fmt: skip
    for _ in range(rng.randrange(2, 8)):
        product = rng.randrange(500)
        msgs.append(
            {"type": "track", "userId": customer, "event": "Product Viewed",
             "properties": {"product_id": f"p{product}", "category": _CATEGORIES[product % 8]}}
        )  # fmt: skip
    for _ in range(rng.choice((0, 0, 1, 2))):
        product = rng.randrange(500)
        msgs.append(
            {"type": "track", "userId": customer, "event": "Product Added",
             "properties": {"product_id": f"p{product}", "name": f"Product {product}",
                            "price": round(rng.uniform(5, 120), 2), "quantity": 1,
                            "category": _CATEGORIES[product % 8], "cart_id": f"cart-{customer}"}}
        )  # fmt: skip
    from engine.events import normalize

    out = []
    for i, msg in enumerate(msgs):
        msg["messageId"] = f"{customer}-{i}"
        out.append(normalize(msg, kind=None, received_at=now - 3600 + i))
    return out


async def seed(redis_url: str, shards: int, customers: list[str]) -> int:
    """Append every shopper's events to the shard streams; returns how many events."""
    from engine.store import Store, connect

    store = Store(connect(redis_url), shards)
    rng, now, total, batch = random.Random(7), time.time(), 0, []
    try:
        for customer in customers:
            batch.extend(shopper_events(rng, customer, now))
            if len(batch) >= 2000:
                await store.append(batch)
                total, batch = total + len(batch), []
        if batch:
            await store.append(batch)
            total += len(batch)
    finally:
        await store.close()
    return total


# -- load generation ----------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; requests go one at a time."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        """Connect (again)."""
        await self.close()
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def close(self) -> None:
        """Close the socket if open."""
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one request; (status, response head) once the whole body is read."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lowered = head.lower()
        at = lowered.find(b"\r\ncontent-length:")
        if at < 0:
            raise ValueError("answer without Content-Length")
        length = int(lowered[at + 17 : lowered.find(b"\r\n", at + 2)].strip())
        if length:
            await self.reader.readexactly(length)
        return int(head[9:12]), lowered


def request_bytes(path: str, port: int) -> bytes:
    """A GET with the content key, keep-alive."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: {CONTENT_AUTH}\r\n\r\n"
    ).encode()


class Workload:
    """Customers in random order, each asked `passes` times in a row; wraps around."""

    def __init__(self, customers: list[str], passes: int, seed: int = 3):
        order = list(customers)
        random.Random(seed).shuffle(order)
        self.order = [c for c in order for _ in range(passes)]
        self.at = 0

    def take(self, n: int) -> list[str]:
        """The next `n` customer ids."""
        out = [self.order[(self.at + i) % len(self.order)] for i in range(n)]
        self.at += n
        return out


@dataclass
class Tally:
    """What one phase sent and got back."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    with_fallback: int = 0
    errors: int = 0
    first: float = math.inf
    last: float = 0.0

    def record(self, status: int, head: bytes, started: float, done: float) -> None:
        """Count one answer."""
        self.latencies.append(done - started)
        self.statuses[status] += 1
        self.first, self.last = min(self.first, started), max(self.last, done)
        at = head.find(b"\r\nx-nudge-fallback:")
        if at >= 0:
            self.with_fallback += 1
            value = head[at + 19 : head.find(b"\r\n", at + 2)].strip().decode()
            self.fallbacks.update(value.split(","))


async def _one(conn: Connection, request: bytes, tally: Tally, scheduled: float) -> None:
    try:
        status, head = await conn.send(request)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        tally.errors += 1
        await conn.close()
        return
    tally.record(status, head, scheduled, time.perf_counter())


async def flat(port: int, requests: list[bytes], seconds: float, connections: int) -> Tally:
    """Each connection sends back to back until `seconds` pass (closed loop)."""
    tally, stop, index = Tally(), time.perf_counter() + seconds, [0]
    conns = [await Connection(port).open() for _ in range(connections)]

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < stop:
            request = requests[index[0] % len(requests)]
            index[0] += 1
            await _one(conn, request, tally, time.perf_counter())

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return tally


async def paced(port: int, requests: list[bytes], rate: float, connections: int) -> Tally:
    """Send `requests` at `rate` per second (open loop); latency from the scheduled time."""
    tally = Tally()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    conns = [await Connection(port).open() for _ in range(connections)]

    async def dispatcher() -> None:
        start = time.perf_counter() + 0.01
        for i, request in enumerate(requests):
            due = start + i / rate
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((due, request))
        for _ in conns:
            queue.put_nowait(None)

    async def worker(conn: Connection) -> None:
        while (item := await queue.get()) is not None:
            await _one(conn, item[1], tally, item[0])

    try:
        await asyncio.gather(dispatcher(), *(worker(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return tally


def hanging_connections(rate: float, args: argparse.Namespace) -> int:
    """Connections for the hanging phase: each answer there holds its connection for
    the whole deadline, so `rate` needs rate x deadline of them, and a margin, or the
    load generator's own queue (not the server) sets the latency."""
    return max(args.paced_connections, math.ceil(rate * (DEADLINE_MS + 50) / 1000.0 * 1.25))


def _pct(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1] * 1000.0


def summarize(tally: Tally) -> dict[str, Any]:
    """Figures of one phase."""
    ordered = sorted(tally.latencies)
    n = len(ordered)
    seconds = max(tally.last - tally.first, 1e-9)
    return {
        "requests": n,
        "seconds": round(seconds, 2),
        "req_s": round(n / seconds, 1),
        "p50_ms": round(_pct(ordered, 50), 2),
        "p99_ms": round(_pct(ordered, 99), 2),
        "p99_9_ms": round(_pct(ordered, 99.9), 2),
        "max_ms": round(ordered[-1] * 1000.0, 2) if ordered else math.nan,
        "non_200": sum(v for k, v in tally.statuses.items() if k != 200),
        "statuses": {str(k): v for k, v in tally.statuses.items()},
        "errors": tally.errors,
        "fallback_rate": round(tally.with_fallback / n, 4) if n else math.nan,
        "fallback_blocks": dict(tally.fallbacks),
    }


# -- processes and CPU ---------------------------------------------------------------------


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def spawn(name: str, argv: list[str], tmp: Path) -> subprocess.Popen:
    """A child process of this benchmark (its own session), logging to a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUDGE_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(tmp / f"{name}.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.content", *argv],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGINT, then SIGKILL of its process group if it does not exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def get_json(port: int, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    """One GET on a fresh connection: (status, parsed JSON or None)."""
    conn = await Connection(port).open()
    try:
        assert conn.writer is not None and conn.reader is not None
        conn.writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            head = await conn.reader.readuntil(b"\r\n\r\n")
            lowered = head.lower()
            at = lowered.find(b"\r\ncontent-length:")
            length = int(lowered[at + 17 : lowered.find(b"\r\n", at + 2)].strip())
            body = await conn.reader.readexactly(length)
    finally:
        await conn.close()
    try:
        return int(head[9:12]), orjson.loads(body)
    except orjson.JSONDecodeError:
        return int(head[9:12]), None


async def wait_for(port: int, path: str, proc: subprocess.Popen, timeout: float) -> Any:
    """Poll until GET `path` answers 200; its JSON."""
    stop_at = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited early")
        with contextlib.suppress(OSError, ValueError, IndexError, TimeoutError):
            status, body = await get_json(port, path, 2.0)
            if status == 200:
                return body
        if time.monotonic() > stop_at:
            raise TimeoutError(f"{path} on {port} not ready in {timeout:.0f} s")
        await asyncio.sleep(0.2)


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Ray's workers, raylet, GCS under the server)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy so far (all cores)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def pid_cpu_s(pid: int) -> float:
    """CPU seconds of one process so far."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            parts = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def server_stats(stats_dir: Path) -> dict[str, Any]:
    """Every API process's figures, added up; asking clears their server-side timings."""
    out: dict[str, Any] = {"workers": 0, "applied": 0, "stats": Counter(), "cache": Counter(),
                           "reads": Counter(), "handled": []}  # fmt: skip
    for path in sorted(stats_dir.glob("*.port")):
        with contextlib.suppress(OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
            one = (await get_json(int(path.read_text()), "/", 10.0))[1]
            out["workers"] += 1
            out["applied"] = max(out["applied"], one["applied"])
            for key in ("stats", "cache", "reads"):
                out[key].update(one[key])
            out["handled"] += one["handled"]
    ordered = sorted(out.pop("handled"))
    times = {f"p{q:g}_ms": round(_pct(ordered, q), 2) for q in (50, 99, 99.9)}
    times["max_ms"] = round(ordered[-1] * 1000, 2) if ordered else None
    out["server_side"] = times
    return out


def api_pids(stats_dir: Path) -> list[int]:
    """The API processes that registered a stats port (one, or the uvicorn workers)."""
    return [int(path.stem) for path in stats_dir.glob("*.port")]


async def measured(
    label: str, work: Any, groups: dict[str, list[int]], stats_dir: Path | None
) -> dict:
    """Run one phase; add CPU cores per process group (and everyone else's) and the
    server-side time per answer (handler start to last byte, no queueing)."""
    if stats_dir is not None:
        await server_stats(stats_dir)  # clears the server-side timings
    before = {k: sum(pid_cpu_s(p) for p in pids) for k, pids in groups.items()}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy, started = machine_busy_s(), time.perf_counter()
    tally = await work
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    out = summarize(tally)
    cores = {
        k: (sum(pid_cpu_s(p) for p in pids) - before[k]) / elapsed for k, pids in groups.items()
    }
    cores["loadgen"] = (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) / elapsed
    machine = (machine_busy_s() - busy) / elapsed
    cores["other_processes"] = machine - sum(cores.values())
    cores["machine"] = machine
    out["cpu_cores"] = {k: round(v, 2) for k, v in cores.items()}
    if stats_dir is not None:
        out["server_side"] = (await server_stats(stats_dir))["server_side"]
    log(
        f"  [{label}] {out['req_s']:,.0f} req/s  p50 {out['p50_ms']} ms  p99 {out['p99_ms']} ms"
        f"  p99.9 {out['p99_9_ms']} ms  fallback {out['fallback_rate']:.2%}"
        f"  non-200 {out['non_200']}  errors {out['errors']}  server-side {out.get('server_side')}"
    )
    log(f"    cores: {out['cpu_cores']}")
    return out


# -- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every phase, in an order that keeps them from overlapping."""
    from engine.redis_server import EmbeddedRedis

    redis = EmbeddedRedis(tmp / "redis")
    redis_url = redis.start()
    procs: list[subprocess.Popen] = []
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    try:
        customers = [f"shopper-{i:06d}" for i in range(args.customers)]
        started = time.perf_counter()
        events = await seed(redis_url, args.shards, customers)
        log(f"seeded {events:,} events for {len(customers):,} customers "
            f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
        stats_dir = tmp / "stats"
        stats_dir.mkdir()
        ports = {"upstream": free_port(), "nudge": free_port(), "bare": free_port()}
        upstream = spawn("upstream", ["--role", "upstream", "--port", str(ports["upstream"]),
                                      "--upstream-ms", str(args.upstream_ms)], tmp)  # fmt: skip
        nudge = spawn("nudge", ["--role", "server", "--port", str(ports["nudge"]),
                                "--redis-url", redis_url, "--shards", str(args.shards),
                                "--upstream-port", str(ports["upstream"]),
                                "--workers", str(args.workers), "--stats-dir", str(stats_dir)],
                      tmp)  # fmt: skip
        bare = spawn("bare", ["--role", "bare", "--port", str(ports["bare"])], tmp)
        procs += [upstream, nudge, bare]
        await wait_for(ports["upstream"], "/stats", upstream, 20)
        await wait_for(ports["bare"], "/bare/x", bare, 20)
        log("waiting for Ray, the shards and the content server ...")
        await wait_for(ports["nudge"], f"/baseline/ray/{customers[0]}", nudge, 120)
        give_up = time.monotonic() + 300
        while (
            len(api_pids(stats_dir)) < args.workers
            or (await server_stats(stats_dir))["applied"] < events
        ):
            if nudge.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError("the content server stopped, or never applied the seed")
            await asyncio.sleep(0.2)
        log(f"shards applied all {events:,} events")
        redis_pid = int((tmp / "redis" / "redis.pid").read_text().strip() or 0)
        tree = descendants(nudge.pid)
        groups = {
            "nudge_api": sorted({nudge.pid, *api_pids(stats_dir)}),
            "ray_and_shards": [p for p in tree if p != nudge.pid and p not in api_pids(stats_dir)],
            "redis": [redis_pid],
            "upstream": [upstream.pid],
        }

        port = ports["nudge"]
        work = Workload(customers, args.passes)

        def content(n: int, blocks: str) -> list[bytes]:
            return [request_bytes(f"/v1/content/{c}?blocks={blocks}", port) for c in work.take(n)]

        up_before = (await get_json(ports["upstream"], "/stats"))[1]
        log("warm-up, 2 s")
        await flat(port, content(20_000, BLOCKS), 2.0, args.connections)
        n_flat = int(args.duration * 12_000)
        log(f"content, flat out: {args.connections} connections, {args.duration:g} s")
        up0 = (await get_json(ports["upstream"], "/stats"))[1]
        results["flat"] = await measured(
            "content flat-out",
            flat(port, content(n_flat, BLOCKS), args.duration, args.connections),
            groups,
            stats_dir,
        )
        # Paced above what the server can take, latency only measures a growing queue:
        # pace at --rate or at --pace-fraction of the flat-out rate, whichever is lower.
        rate = min(args.rate, args.pace_fraction * results["flat"]["req_s"])
        results["paced_rate"] = round(rate, 1)
        n_paced = int(args.duration * rate)
        log(f"content, paced at {rate:,.0f} req/s for {args.duration:g} s")
        results["paced"] = await measured(
            "content paced",
            paced(port, content(n_paced, BLOCKS), rate, args.paced_connections),
            groups,
            stats_dir,
        )
        up1 = (await get_json(ports["upstream"], "/stats"))[1]
        served = results["flat"]["requests"] + results["paced"]["requests"]
        results["upstream_calls_per_request"] = round(
            (up1.get("fast", 0) - up0.get("fast", 0)) / max(served, 1), 3
        )
        log(f"content with a hanging source, paced at {rate:,.0f} req/s")
        results["hanging"] = await measured(
            "hanging source",
            paced(port, content(n_paced, HANG_BLOCKS), rate, hanging_connections(rate, args)),
            groups,
            stats_dir,
        )
        results["server_stats"] = await server_stats(stats_dir)
        results["upstream_counts"] = {
            k: v - up_before.get(k, 0)
            for k, v in (await get_json(ports["upstream"], "/stats"))[1].items()
        }
        if not args.no_baselines:
            seconds = args.baseline_seconds
            log(f"baseline: bare Starlette JSON, flat out {seconds:g} s")
            bare_requests = [request_bytes(f"/bare/{c}", ports["bare"]) for c in customers[:5000]]
            results["bare"] = await measured(
                "bare Starlette",
                flat(ports["bare"], bare_requests, seconds, args.connections),
                {"bare": [bare.pid]},
                None,
            )
            log(f"baseline: one un-coalesced Ray call per request, flat out {seconds:g} s")
            ray_requests = [request_bytes(f"/baseline/ray/{c}", port) for c in customers[:5000]]
            results["ray_per_request"] = await measured(
                "Ray call/request",
                flat(port, ray_requests, seconds, args.connections),
                groups,
                stats_dir,
            )
    finally:
        for proc in procs:
            stop(proc)
        redis.stop()
    return results


def report(results: dict[str, Any]) -> list[str]:
    """The final table."""
    cfg = results["config"]
    flat_, paced_, hang = results["flat"], results["paced"], results["hanging"]

    def lat(r: dict[str, Any]) -> str:
        return f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['p99_9_ms']:.1f} ms"

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    rate_ok = flat_["req_s"] >= TARGET_RPS and paced_["p99_ms"] < TARGET_P99_MS
    hang_ok = hang["p99_ms"] <= DEADLINE_MS + HANG_MARGIN_MS and hang["non_200"] == 0
    rows = [
        ("content flat-out", f"{flat_['req_s']:,.0f} req/s", lat(flat_),
         f"fallback {flat_['fallback_rate']:.2%}"),
        ("content paced", f"{paced_['req_s']:,.0f} req/s", lat(paced_),
         f"fallback {paced_['fallback_rate']:.2%}  target flat >= {TARGET_RPS:,.0f} req/s and "
         f"p99 < {TARGET_P99_MS:g} ms: {verdict(rate_ok)}"),
        ("hanging source, paced", f"{hang['req_s']:,.0f} req/s", lat(hang),
         f"fallback {hang['fallback_rate']:.2%}  non-200 {hang['non_200']}  p99 <= "
         f"{DEADLINE_MS + HANG_MARGIN_MS:g} ms: {verdict(hang_ok)}"),
    ]  # fmt: skip
    for key, label in (("bare", "baseline: bare Starlette JSON"),
                       ("ray_per_request", "baseline: Ray call per request")):  # fmt: skip
        if key in results:
            r = results[key]
            rows.append((label, f"{r['req_s']:,.0f} req/s", lat(r), ""))
    head = (
        f"Nudge content — {os.cpu_count()} cores, {cfg['shards']} shards, "
        f"{cfg['customers']:,} customers x {cfg['passes']} passes, deadline {DEADLINE_MS} ms, "
        f"sources answer in {cfg['upstream_ms']:g} ms"
    )
    lines = ["", head, "-" * len(head)]
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    w2 = max(len(r[2]) for r in rows) + 2
    lines.append(f"{'':<{w0}}{'throughput':>{w1}}  {'p50 / p99 / p99.9':<{w2}}")
    lines += [f"{a:<{w0}}{b:>{w1}}  {c:<{w2}}{d}".rstrip() for a, b, c, d in rows]
    lines.append(
        f"upstream calls per request (normal phases): {results['upstream_calls_per_request']}"
        f"   fallback blocks while hanging: {hang['fallback_blocks']}"
    )
    reads = (results.get("server_stats") or {}).get("reads") or {}
    if reads.get("profile_calls"):
        lines.append(
            f"profile reads per shard call (coalescing): "
            f"{reads['profile_reads'] / reads['profile_calls']:.2f} "
            f"({reads['profile_calls']:,} calls, whole run)"
        )
    per_request = {
        key: round(results[key]["cpu_cores"]["nudge_api"] / results[key]["req_s"] * 1e6)
        for key in ("flat", "paced")
        if results[key]["req_s"]
    }
    lines.append(f"API CPU per request (µs): {per_request}")
    for key in ("flat", "paced", "hanging"):
        r = results[key]
        lines.append(f"{key}: server-side per answer {r.get('server_side')}")
        lines.append(f"{key}: CPU cores {r['cpu_cores']}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.content")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    parser.add_argument(
        "--rate",
        type=float,
        default=TARGET_RPS,
        help="paced req/s (at most --pace-fraction of flat-out)",
    )
    parser.add_argument("--connections", type=int, default=128, help="flat-out connections")
    parser.add_argument(
        "--paced-connections", type=int, default=256, help="paced connections (at least)"
    )
    parser.add_argument(
        "--pace-fraction", type=float, default=0.6, help="paced rate as a share of flat-out"
    )
    parser.add_argument("--customers", type=int, default=50_000)
    parser.add_argument("--passes", type=int, default=2, help="requests per customer visit")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument(
        "--workers", type=int, default=1, help="API processes, as [server] workers in config.toml"
    )
    parser.add_argument("--upstream-ms", type=float, default=5.0)
    parser.add_argument("--baseline-seconds", type=float, default=4.0)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    # child roles
    parser.add_argument("--role", choices=("main", "upstream", "bare", "server"), default="main")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--upstream-port", type=int, default=0)
    parser.add_argument("--stats-dir", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one of its child roles)."""
    args = parse_args(argv)
    if args.role == "upstream":
        run_upstream(args.port, args.upstream_ms)
        return 0
    if args.role == "bare":
        run_bare(args.port)
        return 0
    if args.role == "server":
        run_server(args)
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="nudge-bench-content-"))
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            results = runner.run(run(args, tmp))
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    except Exception:
        for name in ("nudge", "upstream", "bare"):
            path = tmp / f"{name}.log"
            if path.exists():
                log(f"--- {name}.log (tail)\n" + "\n".join(path.read_text().splitlines()[-20:]))
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in report(results):
        print(line)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

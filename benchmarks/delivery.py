"""Delivery benchmark: event-to-ESP latency under ingest load, and webhook sends/s.

Run:  python -m benchmarks.delivery [--rate 10000] [--duration 15] [--sends 4000] [--json out.json]

1. Webhook throughput. A receiver (aiohttp, its own process) answers 200 to
   every POST. Baseline: a bare aiohttp POST loop from this process to the
   same receiver (64 in flight, the same body size). Nudge: sends pre-filled
   in the outboxes of an embedded Redis, one in-process dispatcher (64 in
   flight) reading them through the consumer group, recording each outcome,
   signing and POSTing, with render = false and with render = true (templates).
   Profiles come from an in-memory dict here, so this measures the dispatcher
   and the adapter, not the shards.
2. Event-to-ESP latency. `nudge serve` (4 shards, 2 dispatchers) with one
   immediate rule: identify + "Checkout Started" for a fresh customer makes one
   webhook send; its payload carries the client's send time, so the receiver
   measures from the HTTP request that carried the event to the webhook that
   reaches the ESP. Measured idle (triggers only), then with background ingest
   at --rate events/s in 100-event batches. --workload shoppers (default): the
   ingest benchmark's shopper mix (views, adds, searches, checkouts, orders
   over 5,000 shoppers and 2,000 products), with the starter rules evaluated
   beside the trigger rule (quiet hours off, so the figure does not depend on
   the time of day). --workload views: Product Viewed of 50 products over
   1,000 shoppers and the trigger rule alone (this benchmark's first load).
   Baseline: a bare POST from this process to the receiver, the floor of any
   webhook's latency.

Every figure is printed beside its baseline from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks._http import Connection, basic_auth, build_request, free_port, latency_ms, wait_http
from benchmarks.ingest import Server

HOST = "127.0.0.1"
SECRET = "bench-secret"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the receiver (its own process) ------------------------------------------------------
def receiver_main(port: int) -> None:
    """An ESP stand-in: counts POSTs and, for bodies carrying payload.t, the latency."""
    from aiohttp import web

    state: dict[str, Any] = {"count": 0, "latencies": [], "arrived": [], "from_due": []}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        state["count"] += 1
        if b'"t":' in body:
            doc = orjson.loads(body)
            sent = doc.get("payload", {}).get("t")
            if isinstance(sent, (int, float)):
                state["latencies"].append(now - sent)
                state["arrived"].append(now)
            if isinstance(doc.get("due_at"), (int, float)):
                # From the API's receipt of the event (its timestamp) to the ESP.
                state["from_due"].append(now - doc["due_at"])
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(state), content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        state["count"], state["latencies"], state["arrived"], state["from_due"] = 0, [], [], []
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.add_routes([web.post("/hook", hook), web.get("/stats", stats), web.post("/reset", reset)])
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


async def receiver_stats(session: aiohttp.ClientSession, port: int) -> dict:
    async with session.get(f"http://{HOST}:{port}/stats") as reply:
        return orjson.loads(await reply.read())


async def receiver_reset(session: aiohttp.ClientSession, port: int) -> None:
    async with session.post(f"http://{HOST}:{port}/reset") as reply:
        await reply.read()


async def wait_count(session: aiohttp.ClientSession, port: int, n: int, timeout: float) -> float:
    """Wait until the receiver counted `n` requests; the time it took."""
    started = time.perf_counter()
    while (await receiver_stats(session, port))["count"] < n:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"receiver did not reach {n} requests in {timeout:.0f} s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


# -- 1. webhook throughput ------------------------------------------------------------------
async def bare_posts(port: int, n: int, body: bytes, concurrency: int = 64) -> float:
    """Baseline: requests/s of a plain aiohttp POST loop."""
    url = f"http://{HOST}:{port}/hook"
    counter = itertools.count()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            while next(counter) < n:
                headers = {"Content-Type": "application/json"}
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


async def dispatcher_throughput(redis_url: str, port: int, n: int, *, render: bool) -> float:
    """Sends/s of one in-process dispatcher through the webhook adapter."""
    import dataclasses

    import redis.asyncio as aioredis

    from actors.dispatcher import DispatcherActor
    from engine.config import Config
    from engine.delivery.config import DeliveryConfig, EspConfig
    from engine.routing import shard_for
    from engine.store import outbox_key

    esp = EspConfig(
        name="default",
        kind="webhook",
        url=f"http://{HOST}:{port}/hook",
        secret=SECRET,
        render=render,
    )
    config = dataclasses.replace(
        Config(), delivery=DeliveryConfig(esps=(esp,), dispatchers=1, max_inflight=64)
    )
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    customers = [f"c{i}" for i in range(500)]
    profiles = {
        c: {
            "id": c,
            "traits": {"email": f"{c}@example.com", "first_name": "Ann"},
            "cart": {"p1": {"product_id": "p1", "name": "Wool socks", "price": 9.5}},
            "cart_total": 9.5,
        }
        for c in customers
    }
    async with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            c = customers[i % len(customers)]
            send = {
                "send_id": uuid.uuid4().hex,
                "rule": "bench",
                "step": 1,
                "variant": "classic",
                "customer": c,
                "at": 0.0,
                "template": "cart-reminder-classic",
                "esp": "default",
                "payload": {"first_name": "Ann"},
                "deliver": True,
                "instance": "i",
            }
            pipe.xadd(outbox_key(shard_for(c, config.engine.shards)), {"s": orjson.dumps(send)})
        await pipe.execute()
    await client.aclose()

    async def profile(customer: str) -> dict | None:
        return profiles.get(customer)

    async with aiohttp.ClientSession() as session:
        await receiver_reset(session, port)
        dispatcher = DispatcherActor(0, config, redis_url, profiles=profile, autostart=False)
        started = time.perf_counter()
        await dispatcher.start()
        await wait_count(session, port, n, timeout=300)
        elapsed = time.perf_counter() - started
        await dispatcher.stop()
    return n / elapsed


# -- 2. event-to-ESP latency ---------------------------------------------------------------
CONFIG = """
[server]
port = {port}
[engine]
shards = 4
data_dir = "{data}"
[delivery]
dispatchers = 2
[[esp]]
name = "default"
kind = "webhook"
url = "http://127.0.0.1:{hook}/hook"
secret = "{secret}"

[[rule]]
name = "checkout_started"
on = "Checkout Started"
payload = {{ t = "event.t" }}
[[rule.step]]
template = "cart-reminder-classic"
"""


def trigger_body(customer: str) -> bytes:
    """identify + Checkout Started for a fresh customer, stamped with the send time."""
    batch = [
        {
            "type": "identify",
            "userId": customer,
            "messageId": uuid.uuid4().hex,
            "traits": {"email": f"{customer}@example.com"},
        },
        {
            "type": "track",
            "userId": customer,
            "event": "Checkout Started",
            "messageId": uuid.uuid4().hex,
            "properties": {"t": time.time()},
        },
    ]
    return orjson.dumps({"batch": batch})


def engine_config(port: int, data: Path, hook: int, workload: str) -> str:
    """The engine's config.toml for the latency part; shoppers adds the starter rules."""
    text = CONFIG.format(port=port, data=data, hook=hook, secret=SECRET)
    if workload == "shoppers":
        from engine.rules.files import STARTER

        starter = STARTER.read_text(encoding="utf-8")
        text += "\n" + re.sub(r"(?m)^quiet_hours\s*=.*$", "", starter)
    return text


def shopper_bodies(n: int) -> list[bytes]:
    """`n` request bodies of the ingest benchmark's shopper mix, fresh ids and times."""
    from benchmarks.ingest import Catalog, RequestSource, make_source

    rng = random.Random(7)
    # as many distinct bodies as requests (up to 4,096): reused bodies make every
    # shopper repeat the same few events, which costs the shards more than fresh traffic
    source: RequestSource = make_source(rng, Catalog.build(rng, 5000), f"{HOST}:0", min(n, 4096))
    bodies = []
    for request in source.take(n):
        bodies.append(request.split(b"\r\n\r\n", 1)[1])
    return bodies


def load_body(run: str, seq: int) -> bytes:
    """100 Product Viewed events over 1,000 shoppers, unique messageIds."""
    batch = [
        {
            "type": "track",
            "userId": f"shopper-{(seq * 100 + i) % 1000}",
            "event": "Product Viewed",
            "messageId": f"{run}-{seq}-{i}",
            "properties": {"product_id": f"p{i % 50}"},
        }
        for i in range(100)
    ]
    return orjson.dumps({"batch": batch})


async def paced_load(
    port: int, rate_events: float, seconds: float, stop: asyncio.Event, workload: str
) -> dict:
    """Background ingest at `rate_events` events/s in 100-event requests; what was accepted."""
    auth = basic_auth("dev-write-key")
    host = f"{HOST}:{port}"
    run = uuid.uuid4().hex[:8]
    rps = rate_events / 100
    shoppers = shopper_bodies(int(rps * seconds) + 1) if workload == "shoppers" else None
    conns = [await Connection(HOST, port).open() for _ in range(16)]
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)
    tally = {"ok": 0, "failed": 0, "late": 0}

    async def producer() -> None:
        start = time.perf_counter()
        for seq in itertools.count():
            due = start + seq / rps
            if due - start > seconds or stop.is_set():
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = build_request(
                "POST",
                "/v1/batch",
                host,
                body=shoppers[seq] if shoppers is not None else load_body(run, seq),
                headers={"Authorization": auth, "Content-Type": "application/json"},
            )
            if queue.full():
                tally["late"] += 1
            await queue.put(request)
        for _ in conns:
            await queue.put(None)

    async def worker(conn: Connection) -> None:
        while (request := await queue.get()) is not None:
            try:
                status, _ = await conn.send(request)
                tally["ok" if status == 200 else "failed"] += 1
            except (OSError, asyncio.IncompleteReadError):
                tally["failed"] += 1
                await conn.close()

    started = time.perf_counter()
    await asyncio.gather(producer(), *(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return {
        "events_accepted": tally["ok"] * 100,
        "events_per_s": tally["ok"] * 100 / elapsed,
        "failed_requests": tally["failed"],
    }


async def triggers(port: int, per_s: float, seconds: float) -> tuple[int, list[float]]:
    """Trigger batches at `per_s` for `seconds` (open loop); (accepted, request latencies)."""
    conns = [await Connection(HOST, port).open() for _ in range(8)]
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in conns:
        free.put_nowait(conn)
    auth = basic_auth("dev-write-key")
    rtts: list[float] = []
    accepted = 0

    async def one() -> None:
        nonlocal accepted
        conn = await free.get()
        body = trigger_body("t-" + uuid.uuid4().hex[:12])
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        request = build_request("POST", "/v1/batch", f"{HOST}:{port}", body=body, headers=headers)
        started = time.perf_counter()
        try:
            status, _ = await conn.send(request)
            accepted += status == 200
            rtts.append(time.perf_counter() - started)
        except (OSError, asyncio.IncompleteReadError):
            await conn.close()
        free.put_nowait(conn)

    tasks = []
    start = time.perf_counter()
    for i in itertools.count():
        due = start + i / per_s
        if due - start > seconds:
            break
        await asyncio.sleep(max(due - time.perf_counter(), 0))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    for conn in conns:
        await conn.close()
    return accepted, rtts


async def bare_latency(hook_port: int, n: int = 300) -> dict:
    """Baseline: latency of a direct POST carrying its send time to the receiver."""
    async with aiohttp.ClientSession() as session:
        await receiver_reset(session, hook_port)
        for _ in range(n):
            body = orjson.dumps({"payload": {"t": time.time()}})
            async with session.post(f"http://{HOST}:{hook_port}/hook", data=body) as reply:
                await reply.read()
            await asyncio.sleep(0.005)
        return latency_ms((await receiver_stats(session, hook_port))["latencies"], (50, 99))


def by_window(arrived: list[float], latencies: list[float], window_s: float = 5.0) -> dict:
    """p99 per `window_s` of arrivals, and the second whose slowest send was slowest.

    A p99 that climbs window after window is a backlog or a profile that grows;
    one bad window in many is a pause (a collection, a fork, a long Redis command).
    """
    if not arrived:
        return {"window_s": window_s, "p99_ms": [], "worst_second": None}
    start = min(arrived)
    windows: dict[int, list[float]] = {}
    seconds: dict[int, float] = {}
    for at, latency in zip(arrived, latencies, strict=True):
        windows.setdefault(int((at - start) // window_s), []).append(latency)
        second = int(at - start)
        seconds[second] = max(seconds.get(second, 0.0), latency)
    worst = max(seconds, key=seconds.__getitem__)
    return {
        "window_s": window_s,
        "p99_ms": [  # None for a window in which nothing arrived
            round(latency_ms(windows[w], (99,))["p99"], 1) if w in windows else None
            for w in range(max(windows) + 1)
        ],
        "worst_second": {"at_s": worst, "max_ms": round(seconds[worst] * 1000.0, 1)},
    }


def cpu_groups(api_port: int, engine: Server | None) -> dict[str, list[int]]:
    """Pids of the engine's parts: API, shards (from /v1/status), embedded Redis."""
    from benchmarks.ingest import engine_totals

    if engine is None:
        return {}
    shards = asyncio.run(engine_totals(api_port))["pids"]
    pid_file = Path(engine.cwd) / "data" / "redis" / "redis.pid"
    redis_pid = int(pid_file.read_text().strip()) if pid_file.exists() else 0
    return {"api": [engine.pid], "shards": shards, "redis": [redis_pid] if redis_pid else []}


async def latency_phase(
    api_port: int,
    hook_port: int,
    *,
    rate: float,
    seconds: float,
    workload: str = "views",
    groups: dict[str, list[int]] | None = None,
) -> dict:
    """Trigger latency with background ingest at `rate` events/s (0: idle)."""
    from benchmarks.ingest import CpuSample

    cpu_before = CpuSample.take(groups) if groups else None
    async with aiohttp.ClientSession() as session:
        await receiver_reset(session, hook_port)
        stop = asyncio.Event()
        load = (
            asyncio.create_task(paced_load(api_port, rate, seconds, stop, workload))
            if rate
            else None
        )
        fired, rtts = await triggers(api_port, 40, seconds)
        ingest = await load if load else None
        with contextlib.suppress(TimeoutError):
            await wait_count(session, hook_port, fired, timeout=30)
        stats = await receiver_stats(session, hook_port)
    return {
        "triggers": fired,
        "delivered": stats["count"],
        "latency_ms": latency_ms(stats["latencies"], (50, 99)),
        "api_ack_ms": latency_ms(rtts, (50, 99)),
        "received_to_esp_ms": latency_ms(stats["from_due"], (50, 99)),
        "by_window": by_window(stats["arrived"], stats["latencies"]),
        "cpu": cpu_before.until(CpuSample.take(groups)) if cpu_before else None,
        "ingest": ingest,
    }


def start_engine(tmp: Path, hook_port: int, workload: str, attempts: int = 3) -> tuple[Server, int]:
    """`nudge serve` on a free port, ready; (server, port).

    The port is free when picked, but Ray starts dozens of processes before the
    API binds it, and one of them may take it first: then it tries another port.
    """
    for attempt in range(1, attempts + 1):
        api_port = free_port()
        (tmp / "config.toml").write_text(engine_config(api_port, tmp / "data", hook_port, workload))
        engine = Server(
            "nudge serve",
            [sys.executable, "-m", "engine", "serve", "--config", str(tmp / "config.toml")],
            cwd=tmp,
            log_path=tmp / f"engine-{attempt}.log",
        ).start()
        try:
            asyncio.run(wait_http(HOST, api_port, "/readyz", timeout=120, alive=engine.alive))
            return engine, api_port
        except RuntimeError:
            engine.stop()
            if attempt == attempts or "address already in use" not in engine.log_tail():
                raise
            log(f"port {api_port} was taken before nudge serve bound it; trying another")
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print the figures beside their baselines."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delivery")
    parser.add_argument("--rate", type=float, default=10_000, help="background events/s")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per latency phase")
    parser.add_argument("--sends", type=int, default=4000, help="sends per throughput run")
    parser.add_argument(
        "--workload",
        choices=("shoppers", "views"),
        default="shoppers",
        help="background ingest: the ingest benchmark's shopper mix, or product views",
    )
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("receiver", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver == "receiver":
        receiver_main(args.port)
        return 0

    from engine.redis_server import EmbeddedRedis

    results: dict[str, Any] = {"cpus": os.cpu_count(), "workload": args.workload}
    with tempfile.TemporaryDirectory(prefix="nudge-bench-delivery-") as tmp_name:
        tmp = Path(tmp_name)
        hook_port = free_port()
        receiver = Server(
            "receiver",
            [sys.executable, "-m", "benchmarks.delivery", "receiver", "--port", str(hook_port)],
            cwd=tmp,
            log_path=tmp / "receiver.log",
        ).start()
        redis = EmbeddedRedis(tmp / "redis")
        try:
            asyncio.run(wait_http(HOST, hook_port, "/stats", timeout=30, alive=receiver.alive))
            redis_url = redis.start()
            sample = orjson.dumps(
                {
                    "send_id": "x" * 32,
                    "payload": {"first_name": "Ann"},
                    "to": {"email": "c1@example.com"},
                    "pad": "x" * 600,
                }
            )
            log("throughput: bare aiohttp POST loop ...")
            results["bare_posts_per_s"] = asyncio.run(bare_posts(hook_port, args.sends, sample))
            log("throughput: dispatcher, webhook, render = false ...")
            results["dispatcher_per_s"] = asyncio.run(
                dispatcher_throughput(redis_url, hook_port, args.sends, render=False)
            )
            log("throughput: dispatcher, webhook, render = true ...")
            results["dispatcher_render_per_s"] = asyncio.run(
                dispatcher_throughput(redis_url, hook_port, args.sends, render=True)
            )
            redis.stop()

            engine, api_port = start_engine(tmp, hook_port, args.workload)
            try:
                log("latency: warm-up ...")
                asyncio.run(latency_phase(api_port, hook_port, rate=0, seconds=3))
                log("latency: bare POST baseline ...")
                results["bare_latency_ms"] = asyncio.run(bare_latency(hook_port))
                log("latency: idle engine ...")
                results["idle"] = asyncio.run(
                    latency_phase(api_port, hook_port, rate=0, seconds=args.duration)
                )
                log(f"latency: under {args.rate:,.0f} events/s ingest ...")
                results["loaded"] = asyncio.run(
                    latency_phase(
                        api_port,
                        hook_port,
                        rate=args.rate,
                        seconds=args.duration,
                        workload=args.workload,
                        groups=cpu_groups(api_port, engine),
                    )
                )
            finally:
                engine.stop()
                if not results.get("loaded"):
                    log(engine.log_tail())
        finally:
            receiver.stop()
            redis.stop()
    report(results, args.rate)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


def report(r: dict, rate: float) -> None:
    """Print the figures beside their baselines, with the ratios."""
    bare = r["bare_posts_per_s"]
    print(f"\nmachine: {r['cpus']} CPUs (shared; read figures as a floor)")
    print("webhook sends/s (same receiver, 64 in flight)")
    print(f"  baseline: bare aiohttp POST loop   {bare:>9,.0f} req/s")
    for key, label in (
        ("dispatcher_per_s", "Nudge dispatcher, render=false"),
        ("dispatcher_render_per_s", "Nudge dispatcher, render=true "),
    ):
        print(f"  {label}     {r[key]:>9,.0f} sends/s ({r[key] / bare:.2f}x the baseline)")
    b = r["bare_latency_ms"]
    print("event-to-ESP latency (HTTP event in -> webhook received), ms")
    print(f"  baseline: direct POST to receiver   p50 {b['p50']:7.1f}  p99 {b['p99']:7.1f}")
    print(f"  background workload: {r.get('workload', 'views')}")
    for key, label in (("idle", "idle engine"), ("loaded", f"under {rate:,.0f} ev/s ingest")):
        phase = r[key]
        lat = phase["latency_ms"]
        extra = ""
        if phase["ingest"]:
            extra = f"  (ingest achieved {phase['ingest']['events_per_s']:,.0f} ev/s)"
        print(
            f"  {label:<34} p50 {lat['p50']:7.1f}  p99 {lat['p99']:7.1f}  "
            f"delivered {phase['delivered']}/{phase['triggers']}{extra}"
        )
    print("  of which (per phase):")
    for key in ("idle", "loaded"):
        ack, due = r[key]["api_ack_ms"], r[key]["received_to_esp_ms"]
        print(
            f"    {key:<6} API answers the event  p50 {ack['p50']:7.1f}  p99 {ack['p99']:7.1f};"
            f"  API receipt -> ESP  p50 {due['p50']:7.1f}  p99 {due['p99']:7.1f}"
        )
    loaded = r["loaded"]
    windows = loaded.get("by_window")
    if windows and windows["p99_ms"]:
        worst = windows["worst_second"]
        p99s = " ".join("-" if v is None else f"{v:.0f}" for v in windows["p99_ms"])
        print(
            f"  loaded, p99 per {windows['window_s']:g} s (ms): {p99s};"
            f"  worst second: {worst['max_ms']:.1f} ms at {worst['at_s']} s"
        )
    if loaded.get("cpu"):
        cores = loaded["cpu"]["cores"]
        print("  cores while loaded: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
    print("target: p99 < 100 ms at 10,000 events/s on 2 cores")


if __name__ == "__main__":
    sys.exit(main())

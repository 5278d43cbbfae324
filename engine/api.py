"""The HTTP API (Starlette): Segment-compatible ingest, profiles, health.

Thin: authenticate, parse, validate, hand events to the store, and ask the
shards through a ShardClient. Errors leave as JSON {"error": {...}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from actors.client import ShardClient
from actors.dispatcher import DispatcherMetrics
from engine import events as ev
from engine.auth import ADMIN, WRITE, KeyRing
from engine.bodies import read_limited
from engine.config import Config
from engine.console.routes import console_routes
from engine.content import ContentService, content_first, content_routes
from engine.content.routes import ContentFirst
from engine.delivery.ledger import Ledger
from engine.delivery.routes import delivery_routes
from engine.errors import EngineError, NotFound, PayloadTooLarge, Unavailable, ValidationError
from engine.heap import keep_heap_quiet
from engine.inbound.http import IngestCORS, sdk_routes, webhook_routes
from engine.metrics import process as metered
from engine.metrics.collect import MetricsCollector
from engine.metrics.routes import metrics_routes
from engine.recs.recommender import CollaborativeRecommender
from engine.recs.routes import recs_routes
from engine.recs.store import RecsStore
from engine.store import Store, connect
from engine.tracking import TokenSigner
from engine.tracking.routes import tracking_routes

log = logging.getLogger(__name__)

_OK = b'{"success":true}'


class JSONResponse(Response):
    """orjson-encoded JSON."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


def _error(exc: EngineError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, gunzipped if needed, refusing anything over `limit` bytes."""
    # Past four times the limit, even a compressed body cannot fit.
    body = await read_limited(request, limit * 4, stated=limit)
    encoding = request.headers.get("content-encoding", "").lower().strip()
    if encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(wbits=31)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise ValidationError("body is not valid gzip", field="Content-Encoding") from None
    elif encoding not in ("", "identity"):
        raise ValidationError(
            f"unsupported Content-Encoding {encoding!r}",
            field="Content-Encoding",
            code="unsupported_encoding",
        )
    if len(body) > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    return body


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"malformed JSON: {exc}", field="body", code="invalid_json") from None


def _body_key(parsed: Any) -> str | None:
    # Browsers' sendBeacon cannot set Authorization: like Segment's analytics.js, the
    # write key may travel as "writeKey" in the body instead.
    key = parsed.get("writeKey") if isinstance(parsed, dict) else None
    return f"Bearer {key}" if isinstance(key, str) and key else None


ShardsFactory = Callable[[], Awaitable[ShardClient]]


def create_app(
    config: Config,
    redis_url: str,
    shards_factory: ShardsFactory,
    *,
    content: ContentService | None = None,
    clock: Callable[[], float] = time.time,
    quiet_heap: bool = False,
) -> ContentFirst:
    """The ASGI app; `shards_factory` connects to the shards once the loop runs.

    `content` replaces the content service built from `config.content`, and
    `clock` the time tracking hits are stamped with (tests drive both).
    `quiet_heap` keeps full GC pauses out of this process (engine.heap): for
    the server's own process, not for one shared with other work.
    """
    keys = KeyRing(config.auth)
    state: dict[str, Any] = {}
    # item-to-item collaborative filtering serves the recommendations block (engine.recs)
    recommender = (
        CollaborativeRecommender(redis_url, config.recs) if config.recs.recs_enabled else None
    )
    content = content or ContentService(
        config.content, redis_url=redis_url, recommender=recommender
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["store"] = Store(connect(redis_url), config.engine.shards)
        state["ledger"] = Ledger(connect(redis_url), config.engine.shards)
        state["shards"] = await shards_factory()
        state["recs"] = RecsStore(connect(redis_url))
        await content.start()
        keeper = asyncio.create_task(keep_heap_quiet()) if quiet_heap else None
        yield
        if keeper is not None:
            keeper.cancel()
        await content.close()
        if recommender is not None:
            await recommender.close()
        await state["recs"].close()
        await state["shards"].aclose()
        await state["store"].close()

    def store() -> Store:
        return state["store"]

    def shards() -> ShardClient:
        return state["shards"]

    async def ingest(request: Request, kind: str | None) -> JSONResponse:
        started = time.perf_counter()
        try:
            return await _ingest(request, kind, started)
        except EngineError as exc:
            metered.count_ingest_refused(exc.code)
            raise

    async def _ingest(request: Request, kind: str | None, started: float) -> JSONResponse:
        header = request.headers.get("authorization")
        if header is not None:
            keys.require(header, WRITE)
        received = time.time()
        if kind is None:
            body = await read_body(request, ev.MAX_BATCH_BYTES)
            parsed = _parse(body)
            if header is None:
                keys.require(_body_key(parsed), WRITE)
            accepted, rejected = ev.normalize_batch(
                parsed, received_at=received, body_bytes=len(body)
            )
            if not accepted:
                metered.count_ingest((), rejected, time.perf_counter() - started)
                return JSONResponse(
                    {
                        "error": {
                            "code": "invalid_batch",
                            "message": f"all {len(rejected)} messages were rejected",
                            "field": "batch",
                        },
                        "rejected": rejected,
                    },
                    status_code=400,
                )
        else:
            body = await read_body(request, ev.MAX_EVENT_BYTES)
            parsed = _parse(body)
            if header is None:
                keys.require(_body_key(parsed), WRITE)
            accepted = [ev.normalize(parsed, kind=kind, received_at=received, client=True)]
            rejected = []
        await store().append(accepted)
        metered.count_ingest(accepted, rejected, time.perf_counter() - started)
        if rejected:
            return JSONResponse({"success": True, "accepted": len(accepted), "rejected": rejected})
        return JSONResponse(_OK)

    def single(kind: str) -> Callable:
        async def endpoint(request: Request) -> JSONResponse:
            return await ingest(request, kind)

        endpoint.__name__ = kind
        return endpoint

    async def batch(request: Request) -> JSONResponse:
        return await ingest(request, None)

    async def get_profile(request: Request) -> JSONResponse:
        keys.require(request.headers.get("authorization"), ADMIN)
        customer = request.path_params["customer_id"]
        min_pos = None
        if request.query_params.get("fresh", "1") not in ("0", "false"):
            min_pos = await store().tails()
        found = await shards().profile(customer, min_pos=min_pos)
        if found is None:
            raise NotFound(f"no customer {customer!r}", field="customer_id")
        return JSONResponse(found)

    async def explain(request: Request) -> JSONResponse:
        keys.require(request.headers.get("authorization"), ADMIN)
        customer = request.path_params["customer_id"]
        await shards().profile(customer, min_pos=await store().tails())  # read-your-writes
        found = await shards().explain(customer)
        if found is None:
            raise NotFound(f"no customer {customer!r}", field="customer_id")
        canonical, rules = found
        return JSONResponse({"customer": canonical, "now": time.time(), "rules": rules})

    async def delete_profile(request: Request) -> JSONResponse:
        keys.require(request.headers.get("authorization"), ADMIN)
        customer = request.path_params["customer_id"]
        found = await shards().profile(customer, min_pos=await store().tails())
        targets = [customer]
        if found is not None and found["id"] != customer:
            targets.append(found["id"])  # the id was merged: erase the person it now names
        now = time.time()
        erase = [
            {
                "type": "_erase",
                "customer": c,
                "userId": c,
                "anonymousId": None,
                "messageId": "erase-" + uuid.uuid4().hex,
                "ts": now,
                "receivedAt": now,
            }
            for c in targets
        ]
        written = await store().append(erase)
        for index, pos in written.items():
            if not await shards().wait_applied(index, pos, timeout=10.0):
                raise Unavailable(
                    "erasure is stored but not yet applied; it will be", field="customer_id"
                )
        return JSONResponse({"erased": targets, "existed": found is not None})

    async def healthz(request: Request) -> JSONResponse:
        statuses = await shards().statuses()
        up = sum(1 for s in statuses if s and s["ready"])
        body = {
            "status": "ok" if up == len(statuses) else "starting",
            "shards_ready": up,
            "shards": len(statuses),
        }
        return JSONResponse(body, status_code=200 if up == len(statuses) else 503)

    async def readyz(request: Request) -> JSONResponse:
        redis_ok = await store().ping()
        statuses = await shards().statuses()
        up = sum(1 for s in statuses if s and s["ready"])
        ready = redis_ok and up == len(statuses)
        body = {"ready": ready, "redis": redis_ok, "shards_ready": up, "shards": len(statuses)}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def status(request: Request) -> JSONResponse:
        keys.require(request.headers.get("authorization"), ADMIN)
        statuses = await shards().statuses()
        infos = [await store().info(i) for i in range(config.engine.shards)]
        return JSONResponse(
            {
                "shards": [
                    {**(s or {"index": i, "ready": False}), **info}
                    for i, (s, info) in enumerate(zip(statuses, infos, strict=True))
                ]
            }
        )

    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _error(exc)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"code": code, "message": exc.detail, "field": None}},
            status_code=exc.status_code,
        )

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            {"error": {"code": "internal", "message": "internal error", "field": None}},
            status_code=500,
        )

    routes = [Route(f"/v1/{kind}", single(kind), methods=["POST"]) for kind in ev.TYPES]
    routes += [
        Route("/v1/batch", batch, methods=["POST"]),
        Route("/v1/import", batch, methods=["POST"]),
        Route("/v1/profiles/{customer_id:path}/explain", explain, methods=["GET"]),
        Route("/v1/profiles/{customer_id:path}", get_profile, methods=["GET"]),
        Route("/v1/profiles/{customer_id:path}", delete_profile, methods=["DELETE"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    content_route = content_routes(
        content.config,
        auth=config.auth,
        service=content,
        shards=shards,
        observe=metered.ContentObserver(content),
    )
    routes += content_route
    # PROMETHEUS_MULTIPROC_DIR is set by `nudge serve --workers N` before workers start.
    collector = MetricsCollector(
        shards=shards,
        store=store,
        shard_count=config.engine.shards,
        multiproc_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
        timeout_s=config.metrics.scrape_timeout_s,
    )
    # The dispatchers (Ray actors, found by name) report event-to-ESP latency and ESP requests.
    collector.add_actor_source(
        DispatcherMetrics(config, timeout_s=config.metrics.scrape_timeout_s), label="dispatcher"
    )
    routes += metrics_routes(config.metrics, keys, collector)
    routes += console_routes(config, keys, collector, shards=shards, store=store)
    signer = TokenSigner(config.tracking.tracking_secret, config.tracking.public_url)
    routes += tracking_routes(
        signer,
        lambda events: store().append(events),
        clock=clock,
        latest_optin=lambda customer: store().latest_optin(customer),
    )
    routes += delivery_routes(auth=config.auth, ledger=lambda: state["ledger"])
    routes += recs_routes(keys, lambda: state["recs"], shards)
    routes += webhook_routes(config.webhooks, store=store) + sdk_routes()
    middleware = []
    if config.browser.allowed_origins:
        # Listed origins get CORS; a page of any other origin is refused on ingest.
        middleware.append(Middleware(IngestCORS, origins=config.browser.allowed_origins))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            EngineError: engine_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    # Other actors join /metrics with app.state.metrics.add_actor_source(fn, label=...).
    app.state.metrics = collector
    # Every ESP render calls the content endpoint: it skips routing and middleware.
    return content_first(app, content_route)

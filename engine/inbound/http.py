"""HTTP shells of the other ways in: POST /webhooks/{source}, GET /sdk.js, and CORS for ingest.

Thin: read the raw body, verify, map (engine.inbound.webhooks), normalize (engine.events)
and append to the store, the same durable path as /v1/batch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import events as ev
from engine.bodies import read_limited
from engine.errors import ForbiddenError, NotFound, ValidationError
from engine.inbound.origins import check_origins
from engine.inbound.webhooks import WebhookSource, is_ping, map_payload, verify_signature
from engine.store import Store

MAX_WEBHOOK_BYTES = ev.MAX_BATCH_BYTES
# The paths a browser on the shop's own domain may post to.
INGEST_PATHS = frozenset([f"/v1/{kind}" for kind in ev.TYPES] + ["/v1/batch"])
# Every path that writes events with a write key: a page of a foreign origin may post to none.
WRITE_PATHS = INGEST_PATHS | {"/v1/import"}


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def webhook_routes(
    sources: tuple[WebhookSource, ...], *, store: Callable[[], Store]
) -> list[Route]:
    """POST /webhooks/{source}: 401 on a bad signature, 404 for an unknown source.

    WooCommerce's unsigned ping on saving a webhook is answered 200 and stores nothing.
    """
    by_name = {s.name: s for s in sources}

    async def receive(request: Request) -> Response:
        name = request.path_params["source"]
        source = by_name.get(name)
        if source is None:
            raise NotFound(f"no webhook source {name!r}", field="source")
        # Signatures cover the bytes as sent: no decoding of any kind before verifying.
        body = await read_limited(request, MAX_WEBHOOK_BYTES)
        if is_ping(source, request.headers, body):
            return _json({"success": True, "events": 0, "ping": True})
        verify_signature(source, request.headers, body)
        topic = request.headers.get(source.topic_header)
        if not topic:
            raise ValidationError(
                f"missing {source.topic_header} header", field=source.topic_header
            )
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValidationError(
                f"malformed JSON: {exc}", field="body", code="invalid_json"
            ) from None
        delivery = request.headers.get(source.delivery_header) if source.delivery_header else None
        delivery = delivery or hashlib.blake2b(body, digest_size=16).hexdigest()
        messages = map_payload(source, topic, payload, delivery_id=delivery)
        received = time.time()
        events = [ev.normalize(m, kind=None, received_at=received) for m in messages]
        if events:
            await store().append(events)
        answer: dict[str, Any] = {"success": True, "events": len(events)}
        if source.emits(topic) is None:
            # Acknowledged all the same: a platform retries, then disables, a failing hook.
            answer["ignored"] = f"topic {topic!r} is not mapped"
        return _json(answer)

    return [Route("/webhooks/{source}", receive, methods=["POST"])]


def sdk_routes() -> list[Route]:
    """GET /sdk.js: the first-party browser snippet, a static file of this package."""
    script = resources.files("engine.inbound").joinpath("sdk.js").read_bytes()
    etag = '"' + hashlib.blake2b(script, digest_size=8).hexdigest() + '"'

    async def sdk(request: Request) -> Response:
        headers = {"Cache-Control": "public, max-age=300", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(script, media_type="application/javascript; charset=utf-8", headers=headers)

    return [Route("/sdk.js", sdk, methods=["GET"])]


class IngestCORS:
    """CORS on the ingest endpoints for the configured origins ("*": any); others refused.

    Installed only when origins are configured (with none, pages are neither answered
    nor checked: their beacons still arrive).

    /sdk.js posts `text/plain` bodies, a "simple" request a browser sends without a
    preflight, so leaving the answer unreadable is not enough: a request whose Origin
    is not allowed is refused (403) before it can store anything. Requests with no
    Origin (SDKs on servers, curl) pass. The admin and content endpoints stay
    same-origin: browsers get no CORS answer there.
    """

    def __init__(self, app: ASGIApp, *, origins: tuple[str, ...]):
        self.app = app
        self.origins = frozenset(check_origins(origins))
        self.cors = CORSMiddleware(
            app,
            allow_origins=sorted(self.origins),
            allow_methods=["POST"],
            allow_headers=["Authorization", "Content-Type", "Content-Encoding"],
            max_age=600,
        )

    def allowed(self, origin: str) -> bool:
        """True if pages of `origin` may post events."""
        return "*" in self.origins or origin in self.origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse foreign origins on the write paths; answer CORS on the ingest paths."""
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in WRITE_PATHS:
            await self.app(scope, receive, send)
            return
        origin = Headers(scope=scope).get("origin")
        if origin is None:
            await self.app(scope, receive, send)
        elif not self.allowed(origin):
            refused = ForbiddenError(
                f"pages from {origin[:200]!r} may not post events "
                "(add the origin to [browser] allowed_origins)",
                field="Origin",
                code="origin_not_allowed",
            )
            response = Response(
                orjson.dumps(refused.to_dict()),
                status_code=refused.status,
                media_type="application/json",
                headers={"Vary": "Origin"},
            )
            await response(scope, receive, send)
        elif path in INGEST_PATHS:
            await self.cors(scope, receive, send)
        else:  # /v1/import: bulk history from servers, never answered to browsers
            await self.app(scope, receive, send)

"""The HTTP shell of the content endpoint: auth, options, ETag and Cache-Control.

GET|POST /v1/content/{customer_id}; a content (or admin) key as Authorization
header, or a signed URL (`exp` + `sig`, see signing.py). Errors are JSON, as
everywhere in the API; a failing source never makes one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.routing import Route

from engine.auth import CONTENT, KeyRing
from engine.bodies import check_declared_length
from engine.config import AuthConfig
from engine.content import request as req
from engine.content import signing
from engine.content.config import ContentConfig
from engine.content.service import Answer, ContentService
from engine.errors import AuthError, EngineError, PayloadTooLarge, ValidationError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 65_536
_JSON = b"application/json"
_HTML = b"text/html; charset=utf-8"


def answer_json(answer: Answer) -> dict[str, Any]:
    """The JSON form of an answer: one object per block, in the order asked."""
    return {
        "customer_id": answer.customer_id,
        "profile_id": answer.profile_id,
        "profile": answer.profile,
        "deadline_ms": answer.deadline_ms,
        "blocks": {
            r.name: {
                "data": r.data,
                "html": r.html,
                "source": r.source,
                "fallback": r.fallback,
                "reason": r.reason,
                "stale": r.stale,
                "age_ms": round(r.age_s * 1000.0, 1),
            }
            for r in answer.blocks
        },
        "omitted": answer.omitted,
    }


def etag(answer: Answer, fmt: str) -> str:
    """A weak ETag over what the blocks say (not their ages, which change every call)."""
    content = [
        fmt,
        answer.profile_id,
        [(r.name, r.data, r.html, r.fallback) for r in answer.blocks],
        answer.omitted,
    ]
    digest = hashlib.blake2b(orjson.dumps(content, default=str), digest_size=12).hexdigest()
    return f'W/"{digest}"'


def _matches(header: str | None, tag: str) -> bool:
    if not header:
        return False
    bare = tag.removeprefix("W/")
    return any(
        part.strip() == "*" or part.strip().removeprefix("W/") == bare for part in header.split(",")
    )


Reply = tuple[int, list[tuple[bytes, bytes]], bytes]


def encoded(answer: Answer, fmt: str) -> tuple[str, bytes]:
    """(ETag, body) of `answer` in `fmt`, encoded once however many requests share it."""
    found = answer.encoded.get(fmt)
    if found is None:
        if fmt == "html":
            body = "".join(r.html for r in answer.blocks).encode()
        else:
            body = orjson.dumps(answer_json(answer), default=str)
        found = answer.encoded[fmt] = (etag(answer, fmt), body)
    return found


def respond(answer: Answer, fmt: str, *, if_none_match: str | None, max_age_s: int) -> Reply:
    """The HTTP answer (status, headers, body): ETag, Cache-Control, or 304 when the
    client has it."""
    tag, body = encoded(answer, fmt)
    fallbacks = answer.fallbacks
    # An answer with fallbacks must be asked again: its sources may be back.
    cache = b"private, no-cache" if fallbacks else b"private, max-age=%d" % max_age_s
    headers = [(b"etag", tag.encode()), (b"cache-control", cache)]
    if fallbacks:
        headers.append((b"x-nudge-fallback", ",".join(fallbacks).encode()))
    if _matches(if_none_match, tag):
        return 304, headers, b""
    headers.append((b"content-type", _HTML if fmt == "html" else _JSON))
    return 200, headers, body


def _error(exc: EngineError) -> Reply:
    return exc.status, [(b"content-type", _JSON)], orjson.dumps(exc.to_dict())


class _Disconnected(Exception):
    """The client left before its request body arrived."""


async def _read_body(receive: Any, limit: int, declared: str | None) -> bytes:
    check_declared_length(declared, limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class ContentEndpoint:
    """GET|POST /v1/content/{customer_id} as a plain ASGI app.

    The endpoint every ESP render calls, so it skips Starlette's Request and Response
    objects (about a tenth of a request's CPU at load); errors are the same JSON.
    """

    def __init__(
        self,
        config: ContentConfig,
        *,
        auth: AuthConfig,
        service: ContentService,
        shards: Callable[[], Any],
        clock: Callable[[], float] = time.time,
        observe: Callable[[Answer | None, float, int], None] | None = None,
    ):
        self.config = config
        self.service = service
        self.shards = shards
        self.clock = clock
        self.observe = observe
        self.keys = KeyRing(auth)
        self.signing_keys = auth.content_keys + auth.admin_keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Answer one request."""
        started = time.perf_counter()
        answer: Answer | None = None
        try:
            answer, reply = await self._answer(scope, receive)
        except _Disconnected:
            return
        except EngineError as exc:
            reply = _error(exc)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            reply = 500, [(b"content-type", _JSON)], _INTERNAL
        status, headers, body = reply
        if status != 304:  # a new list: replies such as _NOT_ALLOWED are shared
            headers = [*headers, (b"content-length", str(len(body)).encode())]
        # Measured up to the answer, as when Starlette sent it: not the client's reading.
        elapsed = time.perf_counter() - started
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            if self.observe is not None:
                self.observe(answer, elapsed, status)

    async def _answer(self, scope: dict, receive: Any) -> tuple[Answer | None, Reply]:
        method = scope["method"]
        if method not in _METHODS:
            return None, _NOT_ALLOWED
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        body = b""
        if method == "POST":
            declared = headers.get(b"content-length")
            body = await _read_body(
                receive, MAX_BODY_BYTES, declared.decode("latin-1") if declared else None
            )
        pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        self._authorize(scope, headers.get(b"authorization"), pairs, body)
        customer = _customer_id(scope)
        if method == "POST":
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ValidationError(
                    f"malformed JSON: {exc}", field="body", code="invalid_json"
                ) from None
            creq = req.from_body(customer, parsed, pairs, self.config)
        else:
            creq = req.from_query(customer, pairs, self.config)
        answer = await self.service.answer(self.shards().profile, creq)
        match = headers.get(b"if-none-match")
        return answer, respond(
            answer,
            creq.format,
            if_none_match=match.decode("latin-1") if match is not None else None,
            max_age_s=self.config.max_age_s,
        )

    def _authorize(
        self, scope: dict, header: bytes | None, pairs: list[tuple[str, str]], body: bytes
    ) -> None:
        if header:
            self.keys.require(header.decode("latin-1"), CONTENT)
            return
        if not any(k == signing.SIG for k, _ in pairs):
            raise AuthError("send a content key as Authorization header, or sign the URL")
        # The decoded path as routed (an id may hold "?" or "#" once decoded).
        path = scope.get("root_path", "") + scope["path"]
        signing.verify(self.signing_keys, scope["method"], path, pairs, now=self.clock(), body=body)


_METHODS = frozenset({"GET", "HEAD", "POST"})
_NOT_ALLOWED: Reply = (
    405,
    [(b"content-type", _JSON), (b"allow", b"GET, HEAD, POST")],
    orjson.dumps(
        {"error": {"code": "method_not_allowed", "message": "Method Not Allowed", "field": None}}
    ),
)
_INTERNAL = orjson.dumps(
    {"error": {"code": "internal", "message": "internal error", "field": None}}
)


PREFIX = "/v1/content/"


def _route_path(scope: dict) -> str:
    # Servers that include root_path in path (as Starlette's routing allows for).
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _customer_id(scope: dict) -> str:
    params = scope.get("path_params")
    if params and "customer_id" in params:
        return params["customer_id"]
    return _route_path(scope).removeprefix(PREFIX)


class ContentFirst:
    """Wraps an app so /v1/content/ requests reach the endpoint before routing and
    middleware (none of which the endpoint needs); everything else goes to `app`."""

    def __init__(self, app: Any, endpoint: ContentEndpoint):
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Dispatch one ASGI call."""
        if scope["type"] == "http" and _route_path(scope).startswith(PREFIX):
            return await self.endpoint(scope, receive, send)
        return await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        if name == "app":  # not set yet (copy, pickle): no endless lookup
            raise AttributeError(name)
        return getattr(self.app, name)  # app.state, app.router, … of the wrapped app


def content_routes(
    config: ContentConfig,
    *,
    auth: AuthConfig,
    service: ContentService,
    shards: Callable[[], Any],
    clock: Callable[[], float] = time.time,
    observe: Callable[[Answer | None, float, int], None] | None = None,
) -> list[Route]:
    """The /v1/content routes; `shards()` returns the ShardClient once the app has started.

    `observe(answer or None, seconds, status)` is called once per request (metrics).
    """
    endpoint = ContentEndpoint(
        config, auth=auth, service=service, shards=shards, clock=clock, observe=observe
    )
    return [Route(PREFIX + "{customer_id:path}", endpoint, name="content")]


def content_first(app: Any, routes: list[Route]) -> Any:
    """`app`, with /v1/content/ requests sent straight to the content endpoint of `routes`."""
    endpoint = next(r.endpoint for r in routes if isinstance(r.endpoint, ContentEndpoint))
    return ContentFirst(app, endpoint)

"""The HTTP shell of the content endpoint: auth, options, ETag and Cache-Control.

GET|POST /v1/content/{customer_id}; a content (or admin) key as Authorization
header, or a signed URL (`exp` + `sig`, see signing.py). Errors are JSON, as
everywhere in the API; a failing source never makes one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.auth import CONTENT, KeyRing
from engine.bodies import read_limited
from engine.config import AuthConfig
from engine.content import request as req
from engine.content import signing
from engine.content.config import ContentConfig
from engine.content.service import Answer, ContentService
from engine.errors import AuthError, EngineError, ValidationError

MAX_BODY_BYTES = 65_536
_JSON = "application/json"
_HTML = "text/html; charset=utf-8"


def _error(exc: EngineError) -> Response:
    return Response(orjson.dumps(exc.to_dict()), status_code=exc.status, media_type=_JSON)


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


def respond(answer: Answer, fmt: str, *, if_none_match: str | None, max_age_s: int) -> Response:
    """The HTTP answer: body, ETag, Cache-Control, or 304 when the client has it."""
    tag = etag(answer, fmt)
    fallbacks = answer.fallbacks
    headers = {
        "ETag": tag,
        # An answer with fallbacks must be asked again: its sources may be back.
        "Cache-Control": "private, no-cache" if fallbacks else f"private, max-age={max_age_s}",
    }
    if fallbacks:
        headers["X-Nudge-Fallback"] = ",".join(fallbacks)
    if _matches(if_none_match, tag):
        return Response(status_code=304, headers=headers)
    if fmt == "html":
        body = "".join(r.html for r in answer.blocks).encode()
        return Response(body, headers=headers, media_type=_HTML)
    return Response(
        orjson.dumps(answer_json(answer), default=str), headers=headers, media_type=_JSON
    )


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
    keys = KeyRing(auth)
    signing_keys = auth.content_keys + auth.admin_keys

    async def authorize(request: Request, body: bytes) -> None:
        header = request.headers.get("authorization")
        if header:
            keys.require(header, CONTENT)
            return
        pairs = request.query_params.multi_items()
        if not any(k == signing.SIG for k, _ in pairs):
            raise AuthError("send a content key as Authorization header, or sign the URL")
        # The decoded path as routed (an id may hold "?" or "#" once decoded).
        path = request.scope.get("root_path", "") + request.scope["path"]
        signing.verify(signing_keys, request.method, path, pairs, now=clock(), body=body)

    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        response = await _endpoint(request)
        if observe is not None:
            observe(request.scope.get("nudge.answer"), time.perf_counter() - started,
                    response.status_code)  # fmt: skip
        return response

    async def _endpoint(request: Request) -> Response:
        try:
            body = b""
            if request.method == "POST":
                body = await read_limited(request, MAX_BODY_BYTES)
            await authorize(request, body)
            customer = request.path_params["customer_id"]
            pairs = request.query_params.multi_items()
            if request.method == "POST":
                try:
                    parsed = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise ValidationError(
                        f"malformed JSON: {exc}", field="body", code="invalid_json"
                    ) from None
                creq = req.from_body(customer, parsed, pairs, config)
            else:
                creq = req.from_query(customer, pairs, config)
            answer = await service.answer(shards().profile, creq)
            request.scope["nudge.answer"] = answer
        except EngineError as exc:
            return _error(exc)
        return respond(
            answer,
            creq.format,
            if_none_match=request.headers.get("if-none-match"),
            max_age_s=config.max_age_s,
        )

    path = "/v1/content/{customer_id:path}"
    return [Route(path, endpoint, methods=["GET", "POST"], name="content")]

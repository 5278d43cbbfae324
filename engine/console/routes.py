"""/console: a login form, the page and its static files, and the JSON behind it.

Pages and JSON want a session cookie (see session.py) or an admin Bearer key.
Every value reaches the page as JSON and is written with textContent, and the
page sends a Content-Security-Policy that allows only its own scripts.
"""

from __future__ import annotations

import html
import time
import urllib.parse
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from engine.auth import ADMIN, KeyRing
from engine.config import Config
from engine.console import data
from engine.console.session import COOKIE, Sessions
from engine.errors import AuthError, EngineError, NotFound
from engine.metrics.collect import MetricsCollector
from engine.routing import shard_for, shard_tag
from engine.store import outbox_key

RECENT_SENDS = 20
OUTBOX_SCAN = 5000  # newest outbox entries of the customer's shard looked through
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_STATIC = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(body, default=str),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _read_static(name: str) -> bytes:
    return resources.files("engine.console").joinpath("static").joinpath(name).read_bytes()


def console_routes(
    config: Config,
    keys: KeyRing,
    collector: MetricsCollector,
    *,
    shards: Callable[[], Any],
    store: Callable[[], Any],
    clock: Callable[[], float] = time.time,
) -> list[Route]:
    """The /console routes (none when [metrics] console = false)."""
    if not config.metrics.console:
        return []
    sessions = Sessions(config.auth.admin_keys, config.metrics.console_session_h * 3600.0)
    static = {name: _read_static(name) for name in _STATIC}
    page = _read_static("console.html")
    login_page = _read_static("login.html").decode()

    def signed_in(request: Request) -> bool:
        if sessions.valid(request.cookies.get(COOKIE), clock()):
            return True
        header = request.headers.get("authorization")
        if header:
            try:
                return keys.role_of(header) == ADMIN
            except AuthError:
                return False
        return False

    def html_response(body: bytes | str, status: int = 200) -> Response:
        return Response(
            body,
            status_code=status,
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store",
                     "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"},
        )  # fmt: skip

    def login_form(message: str = "", status: int = 200) -> Response:
        return html_response(login_page.replace("{message}", html.escape(message)), status)

    async def console(request: Request) -> Response:
        if not signed_in(request):
            return login_form()
        return html_response(page)

    async def login(request: Request) -> Response:
        body = (await _read_limited(request, 4096)).decode("utf-8", "replace")
        key = urllib.parse.parse_qs(body).get("key", [""])[0].strip()
        try:
            role = keys.role_of(f"Bearer {key}") if key else None
        except AuthError:
            role = None
        if role != ADMIN:
            return login_form("That is not an admin key.", status=401)
        response = RedirectResponse("/console", status_code=303)
        response.set_cookie(
            COOKIE,
            sessions.issue(clock()),
            max_age=int(sessions.ttl_s),
            path="/console",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/console", status_code=303)
        response.delete_cookie(COOKIE, path="/console")
        return response

    def guard(handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            if not signed_in(request):
                return _json(
                    {"error": {"code": "unauthorized", "message": "sign in", "field": None}}, 401
                )
            try:
                return await handler(request)
            except EngineError as exc:
                return _json(exc.to_dict(), exc.status)

        endpoint.__name__ = handler.__name__
        return endpoint

    async def live(request: Request) -> Response:
        scrape = await collector.gather()
        samples = data.index_samples(collector.registry(scrape).collect())
        return _json(data.live(samples, at=scrape.at, shards=collector.shard_count))

    async def funnel(request: Request) -> Response:
        scrape = await collector.gather()
        return _json(data.funnel(scrape.actors, request.query_params.get("window", "3d")))

    async def customer(request: Request) -> Response:
        cid = request.path_params["customer_id"]
        profile = await shards().profile(cid, min_pos=await store().tails())
        if profile is None:
            raise NotFound(f"no customer {cid!r}", field="customer_id")
        canonical = profile["id"]
        found = await shards().explain(canonical)
        rules = found[1] if found else []
        timers = [
            {"rule": r["rule"], **w} for r in rules for w in r.get("waiting", ())
        ]  # fmt: skip
        return _json(
            {
                "customer": cid,
                "id": canonical,
                "profile": profile,
                "timers": timers,
                "explain": rules,
                "sends": await _recent_sends(store(), canonical, profile, collector.shard_count),
            }
        )

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            return Response(status_code=404)
        return Response(
            static[name], media_type=_STATIC[name], headers={"Cache-Control": "max-age=300"}
        )

    return [
        Route("/console", console, methods=["GET"]),
        Route("/console/login", login, methods=["POST"]),
        Route("/console/logout", logout, methods=["POST"]),
        Route("/console/api/live", guard(live), methods=["GET"]),
        Route("/console/api/funnel", guard(funnel), methods=["GET"]),
        Route("/console/api/customer/{customer_id:path}", guard(customer), methods=["GET"]),
        Route("/console/static/{name}", asset, methods=["GET"]),
    ]


async def _recent_sends(store: Any, canonical: str, profile: dict, shards: int) -> list[dict]:
    """The customer's newest sends, newest first: still in the outbox (queued), parked in the
    dead-letter stream, and the rest from the profile's send history (decided; delivered
    sends leave the outbox, and their delivery records are keyed by send id only)."""
    ids = {canonical, *profile.get("merged_ids", ())}
    index = shard_for(canonical, shards)
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.xrevrange(outbox_key(index), count=OUTBOX_SCAN)
        pipe.xrevrange(f"nudge:{shard_tag(index)}:dlq", count=OUTBOX_SCAN)
        queued, dead = await pipe.execute()
    out: list[dict] = []
    for entries, field, state in ((queued, b"s", "queued"), (dead, b"d", "dead-lettered")):
        for sid, fields in entries:
            if field not in fields:
                continue
            item = orjson.loads(fields[field])
            send = item.get("send", item) if state == "dead-lettered" else item
            if send.get("customer") in ids:
                send = {k: v for k, v in send.items() if k != "payload"}
                out.append({"stream_id": sid.decode(), **send, "state": state})
    known = {(s.get("rule"), round(float(s.get("at", 0)), 3)) for s in out}
    for at, rule in (profile.get("journey") or {}).get("h", ()):
        if (rule, round(float(at), 3)) not in known:
            out.append({"at": at, "rule": rule, "state": "decided"})
    out.sort(key=lambda s: -float(s.get("at") or 0))
    return out[:RECENT_SENDS]


async def _read_limited(request: Request, limit: int) -> bytes:
    """At most `limit` bytes of the body (a login form is a few dozen)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]

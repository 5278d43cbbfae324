"""Tracking and consent endpoints: open pixel, click redirect, unsubscribe (RFC 8058).

The links are in emails, so they carry no API key: the signed token is the
authority. Each hit becomes an ordinary Segment track event on the customer
(Email Opened, Email Link Clicked, Unsubscribed), appended through the same
durable path as any ingest, so rules can react to it and a crash loses nothing.

messageIds are deterministic, so the engine's per-customer dedupe keeps
repeats in check: one open per send per minute (mail clients and privacy
proxies fetch the pixel several times) and one click per send, link and
minute, and one unsubscribe per send and minute, and again after each opt-in
(the last one's id is noted in Redis for an hour), even within that minute. Clients may not send
messageIds of the engine's own prefix.

With Redis down, an open or a click is logged and lost rather than breaking the
image or the link; an unsubscribe is answered 503, never a false "done".
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import html
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from engine import events as ev
from engine.bodies import read_limited
from engine.errors import StoreError, ValidationError
from engine.metrics import process as metered
from engine.tracking.tokens import CLICK, OPEN, UNSUBSCRIBE, BadToken, Token, TokenSigner

log = logging.getLogger(__name__)

# The smallest transparent GIF (43 bytes).
PIXEL = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)
_NO_STORE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
    "Pragma": "no-cache",
}
_MAX_FORM = 16_384  # a one-click body is 26 bytes; multipart framing adds a few hundred


def tracking_event(token: Token, name: str, message_id: str, received_at: float) -> dict:
    """The normalized Segment event a tracking hit becomes."""
    props: dict[str, Any] = {"send_id": token.send_id}
    if token.rule:
        props["rule"] = token.rule
    if token.variant:
        props["variant"] = token.variant
    if token.url:
        props["url"] = token.url
    msg = {
        "userId": token.customer,
        "event": name,
        "messageId": message_id,
        "properties": props,
        "context": {"library": {"name": "nudge-tracking"}},
    }
    return ev.normalize(msg, kind="track", received_at=received_at)


def safe_destination(url: str | None) -> str:
    """The signed click destination, if it is an absolute http(s) URL; else a 400."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValidationError(
            "the link's destination is not an http(s) URL", field="token", code="bad_destination"
        )
    return url  # type: ignore[return-value]


def form_fields(body: bytes, content_type: str) -> dict[str, str]:
    """The text fields of a multipart/form-data or (any other type) urlencoded body."""
    if content_type.lower().startswith("multipart/form-data"):
        # The stdlib's MIME parser reads form-data (RFC 7578): no multipart dependency.
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields = {}
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            try:
                value = part.get_content()
            except (LookupError, ValueError):  # a charset no codec knows, a broken part
                continue
            if isinstance(name, str) and isinstance(value, str):
                fields[name] = value.strip()
        return fields
    # Urlencoded, or a sender that set no type: parsed alike, RFC 8058's own example body.
    text = body.decode("utf-8", "replace")
    return {k: v[0].strip() for k, v in parse_qs(text, keep_blank_values=True).items()}


async def _read_form(request: Request) -> dict[str, str]:
    body = await read_limited(request, _MAX_FORM)
    return form_fields(body, request.headers.get("content-type", ""))


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    text = (
        "<!doctype html><html><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:32em;margin:4em auto;"
        "padding:0 1em;color:#222}button{font:inherit;padding:.5em 1.2em}</style>"
        f"</head><body>{body}</body></html>"
    )
    return HTMLResponse(text, status_code=status, headers=_NO_STORE)


def tracking_routes(
    signer: TokenSigner,
    append: Callable[[list[dict]], Any],
    *,
    clock: Callable[[], float] = time.time,
    latest_optin: Callable[[str], Awaitable[str | None]] | None = None,
) -> list[Route]:
    """The /t/o, /t/c and /u routes; `append(events)` is the durable ingest path and
    `latest_optin(customer)` the id of the customer's last opt-in lately (Store)."""

    async def record_or_lose(event: dict) -> bool:
        # An open or a click is worth less than the image or the link it rides on:
        # with Redis down the reader still gets them, and the event is logged as lost.
        try:
            await append([event])
        except StoreError as exc:
            log.warning("%s %s not stored: %s", event["event"], event["messageId"], exc)
            return False
        return True

    async def opened(request: Request) -> Response:
        # A pixel always answers with the image: a broken one shows in the email.
        now = clock()
        try:
            token = signer.verify(request.path_params["token"], OPEN)
        except BadToken:
            return Response(PIXEL, media_type="image/gif", headers=_NO_STORE)
        if request.method == "GET":  # HEAD: a link checker, not a person
            message_id = f"nudge-open:{token.send_id}:{int(now // 60)}"
            if await record_or_lose(tracking_event(token, "Email Opened", message_id, now)):
                metered.EMAIL_OPENS.labels(token.rule or "-", token.variant or "-").inc()
        return Response(PIXEL, media_type="image/gif", headers=_NO_STORE)

    async def clicked(request: Request) -> Response:
        now = clock()
        token = signer.verify(request.path_params["token"], CLICK)
        url = safe_destination(token.url)
        link = hashlib.blake2b(url.encode(), digest_size=6).hexdigest()
        if request.method == "GET":  # HEAD: mail scanners probe links; that is no click
            message_id = f"nudge-click:{token.send_id}:{link}:{int(now // 60)}"
            if await record_or_lose(tracking_event(token, "Email Link Clicked", message_id, now)):
                metered.EMAIL_CLICKS.labels(token.rule or "-", token.variant or "-").inc()
        return RedirectResponse(url, status_code=302, headers=_NO_STORE)

    async def unsubscribe_page(request: Request) -> Response:
        raw = request.path_params["token"]
        try:
            signer.verify(raw, UNSUBSCRIBE)
        except BadToken:
            return _page("Link not valid", "<h1>This link is not valid</h1>", status=400)
        return _page(
            "Unsubscribe",
            "<h1>Unsubscribe</h1><p>Stop receiving these emails?</p>"
            f'<form method=post action="{html.escape(request.url.path)}">'
            '<input type=hidden name="List-Unsubscribe" value="One-Click">'
            "<button type=submit>Unsubscribe</button></form>",
        )

    async def unsubscribe(request: Request) -> Response:
        # RFC 8058: a POST with List-Unsubscribe=One-Click unsubscribes at once, no
        # confirmation step (the confirmation page's own form posts the same body).
        # Mailbox providers send it as multipart/form-data or urlencoded; without the
        # field it is some other POST, and it unsubscribes nobody.
        raw = request.path_params["token"]
        try:
            token = signer.verify(raw, UNSUBSCRIBE)
        except BadToken:
            return _page("Link not valid", "<h1>This link is not valid</h1>", status=400)
        if (await _read_form(request)).get("List-Unsubscribe", "").lower() != "one-click":
            raise ValidationError(
                "the body must be List-Unsubscribe=One-Click (RFC 8058)",
                field="List-Unsubscribe",
                code="not_one_click",
            )
        now = clock()
        # One per send and minute, as clicks: unsubscribing again after a resubscribe
        # counts, and a link hammered (a provider's retries) cannot flood the profile
        # and push out its dedupe memory. (Clients cannot send nudge- ids first.)
        message_id = f"nudge-unsub:{token.send_id}:{int(now // 60)}"
        try:
            # An opt-in since the last unsubscribe (maybe this minute) makes this one
            # count, not pass for that one's duplicate; its repeats share its id.
            optin = await latest_optin(token.customer) if latest_optin is not None else None
            if optin is not None:
                message_id += ":" + hashlib.blake2b(optin.encode(), digest_size=6).hexdigest()
            event = tracking_event(token, "Unsubscribed", message_id, now)
            await append([event])
        except StoreError as exc:
            # Saying "unsubscribed" without a durable event would be a lie: a 503 the
            # mailbox provider retries, with no Redis internals for the public to read.
            log.warning("Unsubscribed %s not stored: %s", message_id, exc)
            raise StoreError(
                "the unsubscribe could not be recorded just now; please try again shortly"
            ) from exc
        metered.UNSUBSCRIBES.inc()
        return _page(
            "Unsubscribed",
            "<h1>You are unsubscribed</h1><p>You will get no more of these emails.</p>",
        )

    return [
        Route("/t/o/{token}.gif", opened, methods=["GET"]),
        Route("/t/c/{token}", clicked, methods=["GET"]),
        Route("/u/{token}", unsubscribe_page, methods=["GET"]),
        Route("/u/{token}", unsubscribe, methods=["POST"]),
    ]

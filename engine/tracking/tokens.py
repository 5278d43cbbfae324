"""Signed tracking tokens: what an open pixel, a click or an unsubscribe link carries.

A token is `base64url(JSON payload) "." base64url(HMAC-SHA256(secret, payload))`.
The payload names the kind of link, the send, the customer and, for clicks, the
exact URL that was signed, so the click redirect can only go where the email
said (no open redirect). Tokens do not expire: an email opened a year later
still counts, and unsubscribing must always work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from engine.errors import ValidationError

OPEN = "o"
CLICK = "c"
UNSUBSCRIBE = "u"
_KINDS = frozenset({OPEN, CLICK, UNSUBSCRIBE})
_MAX_TOKEN = 4096


class BadToken(ValidationError):
    """A token that is malformed, tampered with or signed by another secret."""

    status = 400


@dataclass(frozen=True)
class Token:
    """What a verified token says."""

    kind: str  # OPEN, CLICK or UNSUBSCRIBE
    send_id: str
    customer: str
    url: str | None = None  # the signed destination of a click
    rule: str | None = None
    variant: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Makes and checks tracking tokens and links with one secret."""

    def __init__(self, secret: str, base_url: str = ""):
        if not secret:
            raise ValueError("a tracking secret is required")
        self._key = hashlib.sha256(b"nudge-tracking\x00" + secret.encode()).digest()
        self.base_url = base_url.rstrip("/")

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:16]

    def token(self, token: Token) -> str:
        """The signed token text for `token`."""
        if token.kind not in _KINDS:
            raise ValueError(f"unknown token kind {token.kind!r}")
        if token.kind == CLICK and not token.url:
            raise ValueError("a click token needs the destination URL")
        data = {"k": token.kind, "s": token.send_id, "c": token.customer}
        if token.url:
            data["u"] = token.url
        if token.rule:
            data["r"] = token.rule
        if token.variant:
            data["v"] = token.variant
        payload = orjson.dumps(data)
        return _b64(payload) + "." + _b64(self._mac(payload))

    def verify(self, text: str, kind: str | None = None) -> Token:
        """The Token that `text` carries; BadToken if it is malformed, forged or of another kind."""
        if not text or len(text) > _MAX_TOKEN or text.count(".") != 1:
            raise BadToken("malformed tracking token", field="token", code="bad_token")
        body, mac = text.split(".")
        try:
            payload, given = _unb64(body), _unb64(mac)
        except ValueError:  # binascii.Error included
            raise BadToken("malformed tracking token", field="token", code="bad_token") from None
        if not hmac.compare_digest(given, self._mac(payload)):
            raise BadToken("tracking token signature mismatch", field="token", code="bad_token")
        try:
            data = orjson.loads(payload)
            found = Token(
                kind=data["k"],
                send_id=data["s"],
                customer=data["c"],
                url=data.get("u"),
                rule=data.get("r"),
                variant=data.get("v"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise BadToken("malformed tracking token", field="token", code="bad_token") from None
        if kind is not None and found.kind != kind:
            raise BadToken("tracking token of another kind", field="token", code="bad_token")
        return found

    def open_url(self, send_id: str, customer: str, **labels: str | None) -> str:
        """The open-pixel URL: GET {base}/t/o/{token}.gif."""
        return f"{self.base_url}/t/o/{self.token(Token(OPEN, send_id, customer, **labels))}.gif"

    def click_url(self, send_id: str, customer: str, url: str, **labels: str | None) -> str:
        """A click-tracking URL that redirects to `url` and nowhere else: GET {base}/t/c/{token}.

        A destination too long to sign within a token `verify` accepts is linked as
        it is, untracked: a tracked link that answered 400 would be a broken link.
        """
        token = self.token(Token(CLICK, send_id, customer, url, **labels))
        parts = urlsplit(url)
        if len(token) > _MAX_TOKEN and parts.scheme in ("http", "https") and parts.netloc:
            return url  # (anything else stays behind the redirect, which refuses it)
        return f"{self.base_url}/t/c/{token}"

    def unsubscribe_url(self, send_id: str, customer: str, **labels: str | None) -> str:
        """The unsubscribe URL (a page on GET, RFC 8058 one-click on POST): {base}/u/{token}."""
        return f"{self.base_url}/u/{self.token(Token(UNSUBSCRIBE, send_id, customer, **labels))}"

"""Real servers on loopback for delivery tests: an SMTP server (aiosmtpd), a webhook
receiver and a SendGrid v3 mail/send stand-in that checks payloads as SendGrid documents."""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.delivery.adapters import webhook
from tests.conftest import free_port, serve_app


# -- SMTP ---------------------------------------------------------------------------------
class _Inbox:
    def __init__(self, script: tuple[str, ...] = ()) -> None:
        self.script = list(script)  # answers to give first (e.g. "451 try later")
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()

    @property
    def send_ids(self) -> list[str]:
        """The X-Nudge-Send-Id of each message accepted, in order."""
        with self.lock:
            return [m["X-Nudge-Send-Id"] for m in self.messages]

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            if self.script:
                return self.script.pop(0)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(parsed)
            self.raw.append(envelope.content)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


@contextlib.contextmanager
def smtp_server(
    *,
    tls_dir: str | None = None,
    login: tuple[str, str] | None = None,
    script: tuple[str, ...] = (),
) -> Iterator[tuple[int, _Inbox]]:
    """A real aiosmtpd server on a loopback port; yields (port, inbox).

    With `tls_dir` it offers and requires STARTTLS (a self-signed certificate made
    there); with `login` it requires AUTH with that user name and password; `script`
    answers the first messages (e.g. "451 4.3.0 try later") before accepting.
    """
    inbox = _Inbox(script)
    port = free_port()
    options: dict = {}
    if tls_dir is not None:
        options.update(tls_context=_self_signed(tls_dir), require_starttls=True)
    if login is not None:

        def authenticate(server, session, envelope, mechanism, auth_data):
            ok = (auth_data.login.decode(), auth_data.password.decode()) == login
            return AuthResult(success=ok, handled=False)

        options.update(authenticator=authenticate, auth_require_tls=tls_dir is not None)
        options["auth_required"] = True
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()


def _self_signed(directory: str) -> ssl.SSLContext:
    cert, key = f"{directory}/cert.pem", f"{directory}/key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


# -- webhook ------------------------------------------------------------------------------
@dataclass
class Hook:
    """A webhook receiver that verifies signatures and dedupes by Idempotency-Key, as an ESP."""

    secret: str
    script: list[tuple[int, dict]] = field(default_factory=list)  # answers to give first
    requests: list[dict] = field(default_factory=list)  # every request, in order
    accepted: dict[str, dict] = field(default_factory=dict)  # idempotency key -> body
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def receive(request: Request) -> Response:
            import asyncio

            body = await request.body()
            now = time.time()
            ok = webhook.verify(
                self.secret,
                body,
                request.headers.get(webhook.TIMESTAMP),
                request.headers.get(webhook.SIGNATURE),
                now=now,
            )
            key = request.headers.get(webhook.IDEMPOTENCY)
            with self.lock:
                self.requests.append({"at": now, "key": key, "verified": ok, "body": body})
                answer = self.script.pop(0) if self.script else None
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if not ok:
                return Response(b'{"error":"bad signature"}', status_code=401)
            if answer is not None:
                status, headers = answer
                return Response(b'{"error":"scripted"}', status_code=status, headers=headers)
            with self.lock:
                self.accepted.setdefault(key, orjson.loads(body))
            return Response(b'{"ok":true}', status_code=200)

        return Starlette(routes=[Route("/hook", receive, methods=["POST"])])

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve on loopback; yields the hook URL."""
        with serve_app(self.app()) as base:
            yield base + "/hook"


# -- SendGrid -----------------------------------------------------------------------------
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def sendgrid_errors(body: object) -> list[dict]:
    """What SendGrid's v3 mail/send would reject in `body` (documented constraints)."""
    errors: list[dict] = []

    def err(message: str, path: str) -> None:
        errors.append({"message": message, "field": path, "help": None})

    if not isinstance(body, dict):
        return [{"message": "Bad Request", "field": None, "help": None}]
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not 1 <= len(personalizations) <= 1000:
        err(
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
        )
        personalizations = []
    for i, p in enumerate(personalizations):
        to = p.get("to") if isinstance(p, dict) else None
        if not isinstance(to, list) or not to:
            err(
                "The to array is required for all personalization objects, and must have "
                "at least one email object with a valid email address.",
                f"personalizations.{i}.to",
            )
            continue
        for j, address in enumerate(to):
            if not isinstance(address, dict) or not _EMAIL.match(str(address.get("email"))):
                err("Does not contain a valid address.", f"personalizations.{i}.to.{j}.email")
        custom = p.get("custom_args", {})
        if not all(isinstance(v, str) for v in custom.values()):
            err("custom_args values must be strings", f"personalizations.{i}.custom_args")
    sender = body.get("from")
    if not isinstance(sender, dict) or not _EMAIL.match(str(sender.get("email"))):
        err("The from object must be provided for every email send.", "from.email")
    if "template_id" not in body and not (isinstance(body.get("subject"), str) and body["subject"]):
        err(
            "The subject is required. You can get around this requirement if you use a "
            "template with a subject defined.",
            "subject",
        )
    content = body.get("content")
    if "template_id" not in body:
        if not isinstance(content, list) or not content:
            err(
                "Unless a valid template_id is provided, the content parameter is required.",
                "content",
            )
        else:
            types = [c.get("type") for c in content]
            if "text/plain" in types and types.index("text/plain") != 0:
                err(
                    "If present, text/plain content must be first, followed by text/html.",
                    "content.0.type",
                )
            if (
                "text/html" in types
                and "text/plain" in types
                and (types.index("text/html") < types.index("text/plain"))
            ):
                err("text/html must follow text/plain.", "content")
            for k, c in enumerate(content):
                if not isinstance(c.get("value"), str) or not c["value"]:
                    err(
                        "The content value must be a string at least one character in length.",
                        f"content.{k}.value",
                    )
    headers = body.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        err("Invalid type. Expected: string, given: non-string.", "headers")
    elif any(
        h.lower()
        in (
            "x-sg-id",
            "x-sg-eid",
            "received",
            "dkim-signature",
            "content-type",
            "content-transfer-encoding",
            "to",
            "from",
            "subject",
            "reply-to",
            "cc",
            "bcc",
        )
        for h in headers
    ):
        err("The headers parameter contains a reserved header.", "headers")
    categories = body.get("categories", [])
    if (
        not isinstance(categories, list)
        or len(categories) > 10
        or not all(isinstance(c, str) and len(c) <= 255 for c in categories)
    ):
        err("Categories must be up to 10 strings of at most 255 characters.", "categories")
    return errors


@dataclass
class FakeSendGrid:
    """POST /v3/mail/send: 401 without the key, 400 with SendGrid's errors, else 202."""

    api_key: str
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def app(self) -> Starlette:
        async def send(request: Request) -> Response:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                body = {
                    "errors": [
                        {
                            "message": "The provided authorization grant is invalid, "
                            "expired, or revoked",
                            "field": None,
                            "help": None,
                        }
                    ]
                }
                return Response(orjson.dumps(body), status_code=401)
            if request.headers.get("content-type") != "application/json":
                return Response(b'{"errors":[{"message":"Content-Type"}]}', status_code=415)
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError:
                return Response(b'{"errors":[{"message":"Bad Request"}]}', status_code=400)
            errors = sendgrid_errors(body)
            if errors:
                self.rejected.append(body)
                return Response(orjson.dumps({"errors": errors}), status_code=400)
            self.accepted.append(body)
            return Response(b"", status_code=202)

        return Starlette(routes=[Route("/v3/mail/send", send, methods=["POST"])])

"""SMTP ESP: the full MIME message (HTML + text, one-click unsubscribe) over aiosmtplib."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr

import aiosmtplib

from engine.delivery.config import EspConfig
from engine.delivery.message import Email, PermanentError, TransientError

# Long ASCII headers (List-Unsubscribe holds a ~200 character URL) must stay verbatim:
# the default policy folds them into RFC 2047 encoded words, which mail clients do not
# read as a URL. 998 is RFC 5322's hard line limit.
# aiosmtplib would flatten with its own policy, so the adapter sends the bytes itself.
_POLICY = SMTP.clone(max_line_length=998)


def to_bytes(message: EmailMessage) -> bytes:
    """The message as sent on the wire (CRLF line ends, long headers kept verbatim)."""
    return message.as_bytes(policy=_POLICY)


def build_message(email: Email, *, now: float, domain: str = "nudge.local") -> EmailMessage:
    """The MIME message: multipart/alternative (text, then HTML), List-Unsubscribe headers.

    The Message-ID derives from the send id, so a re-sent copy is recognisably the same.
    """
    if email.subject is None or email.html is None or email.text is None:
        raise PermanentError("SMTP needs a rendered subject, text and HTML")
    message = EmailMessage(policy=_POLICY)
    message["From"] = formataddr((email.from_name, email.from_email))
    message["To"] = formataddr((email.to_name or "", email.to_email))
    message["Subject"] = email.subject
    message["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    message["Message-ID"] = f"<{email.send_id}@{domain}>"
    for name, value in email.headers.items():
        message[name] = value
    message["X-Nudge-Send-Id"] = email.send_id
    message.set_content(email.text)
    message.add_alternative(email.html, subtype="html")
    return message


class SmtpAdapter:
    """One SMTP connection per send (STARTTLS / implicit TLS and auth when configured)."""

    renders = True

    def __init__(self, esp: EspConfig):
        self.esp = esp
        domain = esp.from_email.rpartition("@")[2] if "@" in esp.from_email else "nudge.local"
        self.domain = domain

    async def send(self, email: Email) -> str:
        """Send over SMTP; 4xx and connection problems are transient, 5xx permanent."""
        import time

        esp = self.esp
        message = build_message(email, now=time.time(), domain=self.domain)
        try:
            _, reply = await aiosmtplib.send(
                to_bytes(message),
                sender=email.from_email,
                recipients=[email.to_email],
                hostname=esp.host,
                port=esp.port,
                username=esp.username or None,
                password=esp.password or None,
                start_tls=esp.starttls,
                use_tls=esp.use_tls,
                validate_certs=esp.validate_certs,
                timeout=esp.timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if any(400 <= c < 500 for c in codes):
                raise TransientError(f"recipient deferred: {detail}") from exc
            raise PermanentError(f"recipient refused: {detail}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise TransientError(f"SMTP {exc.code} {exc.message}") from exc
            raise PermanentError(f"SMTP {exc.code} {exc.message}") from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise TransientError(f"SMTP {type(exc).__name__}: {exc}") from exc
        return reply

    async def close(self) -> None:
        """Nothing held between sends."""

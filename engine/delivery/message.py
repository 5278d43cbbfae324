"""What leaves for an ESP, and how a failed attempt is classified (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.errors import EngineError


@dataclass(frozen=True)
class Email:
    """One message ready for an adapter; subject/html/text are None when not rendered."""

    send_id: str
    customer: str
    to_email: str
    to_name: str | None
    from_email: str
    from_name: str
    subject: str | None
    html: str | None
    text: str | None
    unsubscribe_url: str
    open_url: str
    rule: str | None = None
    step: int | None = None
    variant: str | None = None
    template: str | None = None
    due_at: float | None = None  # when the rule made the send due (epoch seconds)
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        """Headers every message carries: RFC 2369 / RFC 8058 one-click unsubscribe."""
        return {
            "List-Unsubscribe": f"<{self.unsubscribe_url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }


class DeliveryError(EngineError):
    """An attempt to hand a send to an ESP failed."""

    code = "delivery_failed"
    status = 502


class TransientError(DeliveryError):
    """Worth retrying: a 5xx, a 429, a timeout, a refused connection."""

    code = "esp_transient"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """Retrying cannot help: a 4xx the ESP rejected, a template or address problem."""

    code = "esp_rejected"


def classify_http(status: int, body: bytes, retry_after: float | None) -> None:
    """Raise the right DeliveryError for a non-2xx HTTP answer; return for a 2xx."""
    if 200 <= status < 300:
        return
    snippet = body[:300].decode("utf-8", "replace").strip()
    message = f"HTTP {status}" + (f": {snippet}" if snippet else "")
    if status == 429:
        raise TransientError(message, retry_after=retry_after)
    if status in (408, 425) or status >= 500:
        raise TransientError(message, retry_after=retry_after if status == 503 else None)
    raise PermanentError(message)

"""Calls from the `nudge` commands (explain, dlq, render, catalog) to a running engine."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from typing import Any

import orjson

from engine.config import Config
from engine.errors import EngineError


def engine_url(config: Config, url: str | None) -> str:
    """The engine's base URL: `url`, else the configured host and port."""
    return url or f"http://{config.server.host}:{config.server.port}"


def admin_key(config: Config, key: str | None) -> str:
    """The admin key to call with: `key`, else the first configured one."""
    return key or (config.auth.admin_keys[0] if config.auth.admin_keys else "")


def call_engine(
    base: str, key: str, method: str, path: str, body: Any = None, *, timeout: float = 30.0
) -> Any:
    """The engine's JSON answer; EngineError with its message, or with what came instead."""
    request = urllib.request.Request(
        base + path,
        data=orjson.dumps(body) if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            raw = reply.read()
    except urllib.error.HTTPError as exc:
        raise EngineError(f"{exc.code} {_message(exc.read(), exc.reason)}") from None
    except urllib.error.URLError as exc:
        raise EngineError(f"cannot reach {base}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # reset, timed out, not HTTP
        raise EngineError(f"cannot reach {base}: {exc}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EngineError(f"{base} answered something other than JSON: is it Nudge?") from None


def _message(raw: bytes, reason: str) -> str:
    # A proxy's or a plain server's error page is no {"error": ...} body.
    try:
        error = orjson.loads(raw or b"{}").get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return reason
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return reason

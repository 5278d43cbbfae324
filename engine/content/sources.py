"""External HTTP content sources: build the request, call it, map the answer.

The HTTP client sits behind the `Transport` protocol: `Http1Transport`
(engine.content.http1, pooled keep-alive connections for the process) is the
real one, `FakeTransport` the in-memory one. Every failure becomes a
`BlockFailure` with a short reason (timeout, unreachable, http_503, malformed,
too_large, overloaded).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from engine.content.config import SourceConfig
from engine.content.deadline import BlockFailure
from engine.content.template import (
    Template,
    compile_body,
    header_value,
    lookup,
    render_body,
    url_value,
)


# Made per answer, never changed after: not frozen, since a frozen dataclass sets every
# field through object.__setattr__ (about three times the cost of an instance).
@dataclass(slots=True)
class UpstreamRequest:
    """One rendered upstream call and the cache key it answers for."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    key: str


class Transport(Protocol):
    """Sends one HTTP request: (status, body), raising BlockFailure when it cannot."""

    async def send(self, request: UpstreamRequest, *, max_bytes: int) -> tuple[int, bytes]: ...


class FakeTransport:
    """In-memory transport: `handler(request)` returns (status, body) or raises; counts calls."""

    def __init__(self, handler: Callable[[UpstreamRequest], Awaitable[tuple[int, bytes]]]):
        self.handler = handler
        self.calls: list[UpstreamRequest] = []

    async def send(self, request: UpstreamRequest, *, max_bytes: int) -> tuple[int, bytes]:
        """Record the call and answer with the handler."""
        self.calls.append(request)
        status, body = await self.handler(request)
        if len(body) > max_bytes:
            raise BlockFailure("too_large", f"over {max_bytes} bytes")
        return status, body


def map_response(config: SourceConfig, body: bytes) -> Any:
    """The block data in an upstream JSON answer: `select`, then `fields` per item."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BlockFailure("malformed", "the answer is not JSON") from None
    if config.select:
        value = lookup(value, config.select)
        if value is None:
            raise BlockFailure("malformed", f"no {config.select!r} in the answer")
    if config.fields:
        if isinstance(value, list):
            if not all(isinstance(item, dict) for item in value):
                raise BlockFailure("malformed", "items are not objects")
            value = [{out: lookup(item, path) for out, path in config.fields} for item in value]
        elif isinstance(value, dict):
            value = {out: lookup(value, path) for out, path in config.fields}
        else:
            raise BlockFailure("malformed", "the selected value is not an object or a list")
    try:
        # orjson reads deeper nesting than it writes: a value the answer (a few
        # levels around it) could not encode would be a 500 for every request
        # while it stays cached.
        orjson.dumps([[[[[value]]]]])
    except orjson.JSONEncodeError:
        raise BlockFailure("malformed", "the answer is nested too deeply") from None
    return value


class HttpSource:
    """A configured source, its templates compiled once, with a bound on calls in flight."""

    def __init__(self, config: SourceConfig, transport: Transport):
        self.config = config
        self.transport = transport
        self.name = config.name
        self.needs_profile = config.needs_profile
        self.timeout_s = config.timeout_ms / 1000.0
        self._url = Template(config.url)
        self._headers = [(name, Template(value)) for name, value in config.headers]
        # Parsed once: parsing a body's templates per request cost ten times a GET's work.
        self._method = config.method
        self._body = compile_body(config.body) if config.body is not None else None
        self._vary = [tuple(path.split(".")) if path else () for path in config.vary]
        self.inflight = 0
        # Top-level profile fields the templates use: only these are copied per request
        # (customer_id and options are set from the request itself).
        self._roots = sorted(
            (
                {f.partition(".")[0] for f in config.template_fields}
                | {v.partition(".")[0] for v in config.vary}
            )
            - {"customer_id", "options"}
        )

    def request(
        self, customer_id: str, profile: Mapping[str, Any] | None, options: Mapping[str, Any]
    ) -> UpstreamRequest:
        """The upstream call for this customer and these options."""
        roots, method = self._roots, self._method
        context: dict[str, Any] = {k: profile.get(k) for k in roots} if profile and roots else {}
        context["customer_id"] = customer_id
        context["options"] = options
        url = self._url.render(context, url_value)
        # Most sources declare no headers, body or vary: nothing to build for them.
        headers = (
            {n: t.render(context, header_value) for n, t in self._headers} if self._headers else {}
        )
        body = None
        if self._body is not None:
            body = orjson.dumps(render_body(self._body, context))
            headers.setdefault("Content-Type", "application/json")
        vary = [lookup(context, path) for path in self._vary] if self._vary else []
        digest = hashlib.blake2b(
            orjson.dumps([method, url, headers, body and body.decode(), vary]), digest_size=16
        ).hexdigest()
        return UpstreamRequest(method, url, headers, body, f"{self.name}:{digest}")

    async def fetch(self, request: UpstreamRequest) -> Any:
        """Call upstream within the source's timeout and return the mapped data."""
        if self.inflight >= self.config.max_inflight:
            # A hanging upstream may hold this many connections, never the whole pool.
            raise BlockFailure("overloaded", f"{self.inflight} calls in flight")
        self.inflight += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                status, body = await self.transport.send(request, max_bytes=self.config.max_bytes)
        except TimeoutError:
            raise BlockFailure("timeout", f"no answer in {self.config.timeout_ms} ms") from None
        except OSError as exc:
            raise BlockFailure("unreachable", type(exc).__name__) from exc
        finally:
            self.inflight -= 1
        if not 200 <= status < 300:
            raise BlockFailure(f"http_{status}")
        return map_response(self.config, body)

"""A lean HTTP/1.1 client for the content sources, on asyncio Protocols and httptools.

aiohttp cost 150-200 µs of CPU per upstream call in the content process; this
client does only what the sources need:

- keep-alive connections pooled per (scheme, host, port) under one total limit
  (callers queue when it is reached); idle ones close after `keepalive_s`;
- http and https (certificate and host name checked);
- Content-Length, chunked and close-delimited bodies; gzip and deflate decoded,
  with `max_bytes` bounding the declared, received and decoded sizes.

No redirects are followed, no proxies used, and only HTTP/1.1 is spoken. A
connection goes back to the pool only when its answer was read in full and the
server keeps it alive; a failed or cancelled call closes it. Failures are
BlockFailure with the reasons the sources report: unreachable, too_large, malformed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httptools

from engine.content.deadline import BlockFailure
from engine.content.sources import UpstreamRequest

USER_AGENT = "nudge/0.1"
_PORTS = {"http": 80, "https": 443}
# Scheme, netloc (user info, host, port), path and query; the fragment is not sent.
# urlsplit costs about 5 µs a call, so the netloc is parsed once per origin.
_URL = re.compile(r"(?i)(https?)://([^/?#]*)([^#]*)")
_origins: dict[tuple[str, str], _Origin] = {}
# A stale keep-alive connection fails before the server sees the request, so
# only these are sent again (the others might have been acted upon).
_RETRIABLE = frozenset({"GET", "HEAD"})
# Set by us from the request itself; a caller's copy could desynchronise the connection.
_OURS = frozenset({"content-length", "transfer-encoding", "connection"})
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_BAD_HEADER = re.compile(r"[\x00\r\n]")


class _Origin(NamedTuple):
    scheme: str
    host: str
    port: int


class _Stale(BlockFailure):
    """The connection closed before any byte of the answer (maybe idle too long)."""

    def __init__(self, detail: str = "the server closed the connection"):
        super().__init__("unreachable", detail)


class Http1Transport:
    """The real content transport: pooled HTTP/1.1 keep-alive connections."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        max_header_bytes: int = 65536,
        user_agent: str = USER_AGENT,
    ):
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.user_agent = user_agent
        self._ssl = ssl_context
        self._pool = _Pool(self._connect, limit=max_connections, keepalive_s=keepalive_s)

    @property
    def open_connections(self) -> int:
        """Connections open or opening, idle ones included."""
        return self._pool.open

    async def start(self) -> None:
        """Load the default TLS context now rather than on the first https call."""
        self._tls()

    async def close(self) -> None:
        """Close the idle connections; later calls fail as unavailable."""
        self._pool.close()

    def close_expired(self, now: float) -> int:
        """Close connections idle since before `now - keepalive_s` (loop time); how many."""
        return self._pool.close_expired(now)

    async def send(self, request: UpstreamRequest, *, max_bytes: int) -> tuple[int, bytes]:
        """Send `request`; the caller bounds the time it may take."""
        origin, target, host = _split(request.url)
        data = self._encode(request, target, host)
        head_only = request.method == "HEAD"
        retry, fresh = request.method in _RETRIABLE, False
        while True:
            conn = await self._pool.acquire(origin, fresh=fresh)
            try:
                return await self._exchange(conn, data, head_only, max_bytes)
            except _Stale:
                if not (retry and conn.used):
                    raise
                retry, fresh = False, True

    async def _exchange(
        self, conn: _Connection, data: bytes, head_only: bool, max_bytes: int
    ) -> tuple[int, bytes]:
        reader = _Reader(
            asyncio.get_running_loop().create_future(),
            head_only=head_only,
            max_bytes=max_bytes,
            max_header_bytes=self.max_header_bytes,
        )
        answered = False
        try:
            conn.write(data, reader)
            await reader.waiter
            if reader.failure is not None:
                raise reader.failure
            answered = True
            return reader.status, reader.body
        finally:
            if answered and reader.reusable and conn.usable and conn.writes_done():
                self._pool.release(conn)
            else:  # failed, cancelled or not keep-alive: nothing of it may reach the next call
                conn.abort()

    def _encode(self, request: UpstreamRequest, target: str, host: str) -> bytes:
        if _BAD_TARGET.search(target):
            raise BlockFailure(
                "unreachable", f"the URL has spaces or control characters: {request.url[:80]!r}"
            )
        if request.body is None and not request.headers and request.method in _RETRIABLE:
            # A GET (or HEAD) with no body and no header of the source's own: the same
            # bytes as below, without the work.
            return (
                f"{request.method} {target} HTTP/1.1\r\nHost: {host}\r\n"
                f"User-Agent: {self.user_agent}\r\nAccept-Encoding: gzip, deflate\r\n\r\n"
            ).encode()
        given = {name.lower() for name in request.headers}
        lines = [f"{request.method} {target} HTTP/1.1"]
        for name, value in (
            ("Host", host),
            ("User-Agent", self.user_agent),
            ("Accept-Encoding", "gzip, deflate"),
        ):
            if name.lower() not in given:
                lines.append(f"{name}: {value}")
        for name, value in request.headers.items():
            if _BAD_HEADER.search(name) or _BAD_HEADER.search(value):
                raise BlockFailure("unreachable", f"header {name!r} has CR, LF or NUL")
            if name.lower() not in _OURS:
                lines.append(f"{name}: {value}")
        body = request.body
        if body is not None or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode()
        return head + body if body else head

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # verifies certificates and host names
        return self._ssl

    async def _connect(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        host, port = conn.origin.host, conn.origin.port
        try:
            if conn.origin.scheme == "https":
                await loop.create_connection(
                    lambda: conn, host, port, ssl=self._tls(), server_hostname=host
                )
            else:
                await loop.create_connection(lambda: conn, host, port)
        except OSError as exc:  # refused, DNS, TLS verification: all of them are OSError
            raise BlockFailure("unreachable", f"{type(exc).__name__}: {exc}") from exc


def _split(url: str) -> tuple[_Origin, str, str]:
    """(origin, request target, Host header) of an already encoded URL."""
    match = _URL.match(url)
    if match is None:
        raise BlockFailure("unreachable", f"not an http(s) URL: {url[:80]!r}")
    scheme, netloc, target = match.groups()
    if _BAD_TARGET.search(netloc):  # it becomes the Host header as it is
        raise BlockFailure("unreachable", f"the host has spaces or control bytes: {url[:80]!r}")
    if not target.startswith("/"):
        target = "/" + target  # "http://host?q" asks for "/?q"
    origin = _origins.get((scheme, netloc))
    if origin is None:
        origin = _origin(scheme.lower(), netloc)
    return origin, target, netloc.rpartition("@")[2]


def _origin(scheme: str, netloc: str) -> _Origin:
    try:
        parts = urlsplit(f"{scheme}://{netloc}/")
        port = parts.port
    except ValueError as exc:
        raise BlockFailure("unreachable", f"bad URL: {exc}") from None
    if not parts.hostname:
        raise BlockFailure("unreachable", f"no host in {netloc!r}")
    if len(_origins) >= 1024:  # hosts built from templates could grow it without end
        _origins.clear()
    origin = _origins[scheme, netloc] = _Origin(scheme, parts.hostname, port or _PORTS[scheme])
    return origin


class _Connection(asyncio.Protocol):
    """One keep-alive connection; hands what it receives to the current `_Reader`."""

    __slots__ = (
        "_reader",
        "closed",
        "counted",
        "idle_since",
        "origin",
        "pool",
        "transport",
        "used",
    )

    def __init__(self, pool: _Pool, origin: _Origin):
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # holds a place under the pool's limit until it is lost
        self.used = False  # has carried a whole exchange, so it may have gone stale since
        self.idle_since = 0.0
        self._reader: _Reader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._reader is None:  # bytes nobody asked for: the stream cannot be trusted
            self.abort()
        else:
            self._reader.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.lost(exc)
        self.pool.lost(self)

    @property
    def usable(self) -> bool:
        """Open, as far as this loop knows."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes, reader: _Reader) -> None:
        """Send a request whose answer `reader` reads."""
        self._reader = reader
        try:
            self.transport.write(data)  # type: ignore[union-attr]
        except (OSError, RuntimeError) as exc:  # closed under us: as if it had gone stale
            raise _Stale(f"write failed: {exc!r}") from exc

    def writes_done(self) -> bool:
        """Whether the request went out in full (an early answer may leave some unsent)."""
        return self.transport is not None and self.transport.get_write_buffer_size() == 0

    def idle(self, now: float) -> None:
        """Detach the finished reader: anything received from now on closes the connection."""
        self._reader = None
        self.used = True
        self.idle_since = now

    def abort(self) -> None:
        """Close at once, dropping whatever is buffered either way."""
        self._reader = None
        if self.transport is not None and not self.closed:
            self.transport.abort()


class _Reader:
    """Reads one answer with httptools; the parser's callbacks land here."""

    __slots__ = (
        "body",
        "chunked",
        "chunks",
        "decoder",
        "done",
        "encoding",
        "failure",
        "head",
        "head_only",
        "headers_done",
        "length",
        "max_bytes",
        "max_header_bytes",
        "parser",
        "raw",
        "received",
        "reusable",
        "size",
        "status",
        "waiter",
    )

    def __init__(
        self,
        waiter: asyncio.Future[None],
        *,
        head_only: bool,
        max_bytes: int,
        max_header_bytes: int,
    ):
        self.waiter = waiter
        self.head_only = head_only
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.parser = httptools.HttpResponseParser(self)
        self.done = False  # the waiter is woken: `body` or `failure` is set
        self.failure: BlockFailure | None = None
        self.body = b""
        self.reusable = False  # answered in full, keep-alive, and nothing after it
        self.received = 0  # bytes, all told
        self.head = 0  # bytes of header lines, interim answers' included
        self.headers_done = False
        self.status = 0
        self.length: int | None = None
        self.chunked = False
        self.encoding = b""
        self.decoder: Any = None
        self.chunks: list[bytes] = []
        self.raw = 0
        self.size = 0

    def feed(self, data: bytes) -> None:
        """Parse the next bytes of the answer."""
        if self.done:  # more than the answer: the connection is not reused
            self.reusable = False
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.fail(BlockFailure("malformed", f"{type(exc).__name__}: {exc}"))
            return
        if not self.headers_done and self.received > self.max_header_bytes:  # an endless line
            self.fail(BlockFailure("too_large", f"headers over {self.max_header_bytes} bytes"))

    def lost(self, exc: Exception | None) -> None:
        """The connection closed: the end of a close-delimited body, or a failure."""
        if self.done:
            return
        if self.headers_done and self._until_eof() and exc is None:  # not a reset
            self.finish(keep_alive=False)
        elif self.received == 0:
            self.fail(_Stale())
        else:
            self.fail(BlockFailure("unreachable", f"closed mid-answer ({exc!r})"))

    def fail(self, failure: BlockFailure) -> None:
        """End with `failure` (the connection will be closed)."""
        self.done = True
        self.reusable = False
        self.failure = failure
        if not self.waiter.done():
            self.waiter.set_result(None)

    def finish(self, *, keep_alive: bool) -> None:
        """End with the status and the (decoded) body."""
        self.done = True
        body = b"".join(self.chunks)
        if self.decoder is not None:
            tail = self.decoder.flush()
            if self.size + len(tail) > self.max_bytes:
                return self.fail(BlockFailure("too_large", f"over {self.max_bytes} bytes decoded"))
            if not self.decoder.eof:
                return self.fail(BlockFailure("malformed", "truncated compressed body"))
            body += tail
        self.reusable = keep_alive
        self.body = body
        if not self.waiter.done():
            self.waiter.set_result(None)

    def _until_eof(self) -> bool:
        return (
            self.length is None
            and not self.chunked
            and not self.head_only
            and self.status not in (204, 304)
        )

    # -- httptools callbacks ----------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:
            self.reusable = False
            return
        # Also after a 1xx interim answer: the final one starts afresh.
        self.length, self.chunked, self.encoding = None, False, b""

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.done:
            return
        self.head += len(name) + len(value) + 4  # as on the wire: ": " and CRLF
        if self.head > self.max_header_bytes:
            return self.fail(
                BlockFailure("too_large", f"headers over {self.max_header_bytes} bytes")
            )
        name = name.lower()
        if name == b"content-length":
            self.length = int(value)  # llhttp has checked it is digits
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()
        elif name == b"content-encoding":
            self.encoding = value.strip().lower()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.done or (status < 200 and status != 101):
            return  # an interim answer (103 Early Hints, a stray 100): the real one follows
        self.status = status
        self.headers_done = True
        if status == 101:
            return self.fail(BlockFailure("malformed", "101 Switching Protocols"))
        if self.length is not None and self.length > self.max_bytes:
            return self.fail(BlockFailure("too_large", f"{self.length} bytes declared"))
        if self.encoding not in (b"", b"identity", b"gzip", b"x-gzip", b"deflate"):
            return self.fail(BlockFailure("malformed", f"content-encoding {self.encoding!r}"))
        if self.head_only:  # the parser expects the body the headers describe: none comes
            self.finish(keep_alive=self._keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.reusable = False
            return
        self.raw += len(body)
        if self.raw > self.max_bytes:
            return self.fail(BlockFailure("too_large", f"over {self.max_bytes} bytes"))
        if self.encoding not in (b"", b"identity"):
            body = self._decode(body)
            if self.done:
                return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if not self.done and self.parser.get_status_code() >= 200:
            self.finish(keep_alive=self._keep_alive())

    def _keep_alive(self) -> bool:
        # HTTP/1.0 answers are not reused even with `Connection: keep-alive`.
        return self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"

    def _decode(self, body: bytes) -> bytes:
        if self.decoder is None:
            if self.encoding == b"deflate" and body[0] & 0x0F != 8:
                wbits = -zlib.MAX_WBITS  # raw deflate without the zlib header, as some send it
            elif self.encoding == b"deflate":
                wbits = zlib.MAX_WBITS
            else:
                wbits = 16 + zlib.MAX_WBITS  # gzip
            self.decoder = zlib.decompressobj(wbits)
        room = self.max_bytes - self.size
        try:
            # At most one byte more than allowed: a small bomb never expands in memory.
            out = self.decoder.decompress(body, room + 1)
        except zlib.error as exc:
            self.fail(BlockFailure("malformed", f"bad {self.encoding.decode()} body: {exc}"))
            return b""
        self.size += len(out)
        if self.size > self.max_bytes:
            self.fail(BlockFailure("too_large", f"over {self.max_bytes} bytes decoded"))
        return out


class _Pool:
    """Keep-alive connections per origin under one total limit; callers queue beyond it."""

    def __init__(
        self,
        connect: Callable[[_Connection], Awaitable[None]],
        *,
        limit: int,
        keepalive_s: float,
    ):
        self._connect = connect
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.open = 0  # connections open or opening: what the limit counts
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def acquire(self, origin: _Origin, *, fresh: bool) -> _Connection:
        """An idle connection to `origin` (unless `fresh`), else a new one when the limit allows."""
        first = True
        while True:
            if self._closed:
                raise BlockFailure("unavailable", "the HTTP client is closed")
            if not fresh and (conn := self._pop_idle(origin)) is not None:
                return conn
            if self.open < self.limit:
                return await self._open(origin)
            # At the limit: an idle connection elsewhere gives its place up (once it is
            # closed, it wakes a waiter); otherwise wait for a call to finish.
            self._close_one_idle()
            await self._wait(first)
            first = False

    def release(self, conn: _Connection) -> None:
        """Take back a connection whose answer was read in full."""
        loop = asyncio.get_running_loop()
        conn.idle(loop.time())
        if self._closed:
            conn.abort()
            return
        self._idle.setdefault(conn.origin, deque()).append(conn)
        if self._timer is None:
            self._timer = loop.call_at(conn.idle_since + self.keepalive_s, self._expire)
        self._wake()

    def lost(self, conn: _Connection) -> None:
        """A connection closed: its place under the limit is free."""
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self._wake()

    def close_expired(self, now: float) -> int:
        """Close connections idle for `keepalive_s` by `now`; how many."""
        closed = 0
        for origin, idle in list(self._idle.items()):
            while idle and (idle[0].closed or idle[0].idle_since + self.keepalive_s <= now):
                conn = idle.popleft()
                closed += not conn.closed
                conn.abort()
            if not idle:
                del self._idle[origin]
        return closed

    def close(self) -> None:
        """Close every idle connection and refuse further calls."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _pop_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if conn.usable:
                return conn
        return None

    def _close_one_idle(self) -> None:
        for idle in self._idle.values():
            while idle:
                conn = idle.popleft()
                if conn.usable:
                    conn.abort()
                    return

    async def _open(self, origin: _Origin) -> _Connection:
        self.open += 1
        conn = _Connection(self, origin)
        try:
            await self._connect(conn)
        except BaseException:
            conn.abort()
            self.lost(conn)
            raise
        return conn

    async def _wait(self, first: bool) -> None:
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.append(waiter)
        else:  # woken but beaten to it: keep the place in the queue
            self._waiters.appendleft(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, then cancelled: pass the turn on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        self.close_expired(loop.time())
        if self._idle:
            at = min(idle[0].idle_since for idle in self._idle.values()) + self.keepalive_s
            self._timer = loop.call_at(at, self._expire)

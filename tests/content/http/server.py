"""A loopback HTTP/1.1 server on the test's own event loop, scripted per test.

Each test passes `answer(request, conn)`: it writes whatever bytes it likes to
`conn.writer` (well-formed or not) and returns True to read the next request on
the same connection, False to close it. The server counts what the client
under test did: connections accepted, open at once, requests per connection.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    """One request as the server read it."""

    method: str
    target: str
    version: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    conn: int  # which connection (1-based, in order of acceptance)


@dataclass
class Conn:
    """One accepted connection."""

    number: int
    writer: asyncio.StreamWriter
    stopping: asyncio.Event
    requests: int = 0

    async def hold(self) -> None:
        """Answer no more, until the server stops (the client gives up first)."""
        await self.stopping.wait()


Answer = Callable[[Request, Conn], Awaitable[bool]]


@dataclass
class Server:
    """Listens on 127.0.0.1; `answer` scripts the replies (default: 200 `ok`)."""

    answer: Answer | None = None
    tls: ssl.SSLContext | None = None
    port: int = 0
    accepted: int = 0
    open: int = 0
    max_open: int = 0
    requests: list[Request] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every close
    _server: asyncio.Server | None = None
    _conns: set[asyncio.StreamWriter] = field(default_factory=set)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT"""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._stopping.set()  # held answers end, rather than being cancelled with the loop
        for writer in list(self._conns):
            writer.transport.abort()
        self._server.close()
        await self._server.wait_closed()
        await self.wait_closed(0)

    async def wait_closed(self, count: int) -> None:
        """Until only `count` connections are left open (the test's own timeout bounds it)."""
        while self.open > count:
            self.closed.clear()
            await self.closed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        conn = Conn(self.accepted, writer, self._stopping)
        self._conns.add(writer)
        try:
            while (request := await _read(reader, conn.number)) is not None:
                conn.requests += 1
                self.requests.append(request)
                if not await (self.answer or _ok)(request, conn):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._conns.discard(writer)
            writer.transport.abort()
            self.open -= 1
            self.closed.set()


async def _read(reader: asyncio.StreamReader, conn: int) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed the connection
    line, *lines = head.decode("utf-8").split("\r\n")
    method, target, version = line.split(" ")
    headers = {}
    for header in filter(None, lines):
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, target, version, headers, body, conn)


async def _ok(request: Request, conn: Conn) -> bool:
    conn.writer.write(reply(b"ok"))
    return True


def reply(body: bytes, status: str = "200 OK", *headers: str, version: str = "1.1") -> bytes:
    """A whole answer with Content-Length."""
    head = [f"HTTP/{version} {status}", f"Content-Length: {len(body)}", *headers, "", ""]
    return "\r\n".join(head).encode() + body


def chunked(*chunks: bytes) -> bytes:
    """The chunked encoding of `chunks`, with the terminating chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def gzipped(body: bytes) -> bytes:
    """`body` gzip-compressed (deterministic)."""
    return gzip.compress(body, mtime=0)

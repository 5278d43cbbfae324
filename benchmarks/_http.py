"""Shared benchmark helpers: a raw asyncio HTTP/1.1 keep-alive client and percentiles.

httpx costs far more CPU per request than the servers under test on a 2-core
machine, so load generators here write pre-built request bytes straight to a
socket and parse only the status line and the framing headers of the answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

_HEAD_END = b"\r\n\r\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def basic_auth(user: str, password: str = "") -> str:
    """The value of an Authorization header for HTTP Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def build_request(
    method: str,
    path: str,
    host: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """The complete bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower case) in a raw response head, or None."""
    lowered = head.lower()
    at = lowered.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    end = lowered.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it go one at a time.

    A connection idle for longer than `max_idle` seconds is reopened before the
    next request, as servers close idle keep-alive connections (uvicorn: 5 s).
    """

    def __init__(self, host: str, port: int, *, max_idle: float = 4.0):
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.last_used = 0.0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        """Connect (or reconnect) to the server."""
        await self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.last_used = time.monotonic()
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def close(self) -> None:
        """Close the socket if open."""
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send pre-built request bytes and return (status, body) of the answer."""
        if self.writer is None or time.monotonic() - self.last_used > self.max_idle:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        reader = self.reader
        head = await reader.readuntil(_HEAD_END)
        self.last_used = time.monotonic()
        status = int(head[9:12])
        length = _header(head, b"content-length")
        if length is not None:
            body = await reader.readexactly(int(length)) if length != b"0" else b""
        elif (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
            body = await _read_chunked(reader)
        else:  # no framing: the body runs to the end of the connection
            body = await reader.read()
            await self.close()
            return status, body
        if (_header(head, b"connection") or b"").lower() == b"close":
            await self.close()
        return status, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """The body of a chunked response."""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def fetch_json(
    host: str, port: int, path: str, *, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    """One GET on a fresh connection: (status, parsed JSON body or None)."""
    conn = await Connection(host, port).open()
    try:
        status, body = await conn.send(
            build_request("GET", path, f"{host}:{port}", headers=headers)
        )
    finally:
        await conn.close()
    try:
        return status, orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return status, None


async def wait_http(host: str, port: int, path: str, *, timeout: float, alive: Any = None) -> None:
    """Poll GET `path` until it answers 200; `alive()` False means the server died."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"server on port {port} exited before it answered {path}")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            status, _ = await fetch_json(host, port, path)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} on port {port} not 200 after {timeout:.0f} s")
        await asyncio.sleep(0.2)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of already sorted values, nearest rank; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def latency_ms(values: Iterable[float], qs: Sequence[float] = (50, 99, 99.9)) -> dict[str, float]:
    """Percentiles of latencies in seconds, as {"p50": ms, ...}, plus the max and count."""
    ordered = sorted(values)
    out = {f"p{q:g}": percentile(ordered, q) * 1000.0 for q in qs}
    out["max"] = (ordered[-1] * 1000.0) if ordered else math.nan
    out["n"] = len(ordered)
    return out

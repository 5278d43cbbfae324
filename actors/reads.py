"""Profile reads straight from a shard over TCP: Ray finds the shard, this carries the bytes.

A Ray actor call costs about 700 µs of CPU in the shard's process (Ray's own threads)
and 70 µs in the caller, whatever it carries; content requests read about two
profiles per call. So a shard also serves `get_profiles` on a socket of its own, and
Ray only tells a client where that socket is and which token opens it.

The protocol, both ways: frames of a 4-byte big-endian length and an orjson body of
at most `MAX_FRAME` bytes. A client's first frame is `{"token": "<hex>"}`; a wrong
token closes the connection with no answer. Then strictly one request, one answer:
`{"ids": [...], "min_pos": str | None}` gets the list `get_profiles` returns, or
`{"error": "..."}` if it raised. A frame that is too large or not such an object
closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from engine.errors import Unavailable

log = logging.getLogger(__name__)

MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
# An unauthenticated connection gets this long, and this many bytes, to send its token
# (clients send it at once); past this many of them at a time, new ones are closed, so
# idle connections to an open port cannot use up the shard's file descriptors.
_HELLO_TIMEOUT_S = 2.0
_HELLO_MAX = 1024
MAX_UNAUTHENTICATED = 64
# get_profiles waits up to 5 s for min_pos (ShardActor.wait_applied): a shard silent
# for twice that is taken for gone, and the read goes over Ray.
REQUEST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

Answer = Callable[[list[str], str | None], Awaitable[list[Any]]]


class DirectReadError(Unavailable):
    """The shard's read channel failed or refused a frame; the read can go over Ray."""

    code = "direct_read_failed"


class RemoteReadError(DirectReadError):
    """The shard answered with an error frame: its get_profiles raised."""

    code = "direct_read_error"


def encode_frame(body: Any) -> bytes:
    """`body` as one frame: length prefix and orjson bytes."""
    data = orjson.dumps(body)
    if len(data) > MAX_FRAME:
        raise DirectReadError(f"frame of {len(data)} bytes is over {MAX_FRAME}")
    return _HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> Any:
    """The next frame's decoded body; DirectReadError if it is too large or not JSON."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > max_frame:
        raise DirectReadError(f"frame of {size} bytes is over {max_frame}")
    try:
        return orjson.loads(await reader.readexactly(size))
    except orjson.JSONDecodeError as exc:
        raise DirectReadError(f"frame is not JSON: {exc}") from exc


class ReadServer:
    """A shard's read socket: answers authenticated get_profiles requests with `answer`."""

    def __init__(self, answer: Answer, *, max_frame: int = MAX_FRAME):
        self._answer = answer
        self.max_frame = max_frame
        self._token = secrets.token_hex(16)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.endpoint: dict | None = None
        self.requests = 0
        self.refused = 0  # connections closed at once: too many waiting for their token
        self._greeting = 0

    async def start(self, host: str) -> dict:
        """Listen on `host`, on a port the system picks; returns the endpoint clients need."""
        self._server = await asyncio.start_server(self._serve, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = {"host": host, "port": port, "token": self._token}
        return self.endpoint

    async def close(self) -> None:
        """Stop listening and close every open connection."""
        self.endpoint = None
        if self._server is not None:
            self._server.close()
        # Before 3.12, closing the server leaves accepted connections open.
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def status(self) -> dict:
        """Port, open connections and requests answered so far."""
        port = self.endpoint["port"] if self.endpoint else None
        return {
            "port": port,
            "connections": len(self._writers),
            "requests": self.requests,
            "refused": self.refused,
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._greeting >= MAX_UNAUTHENTICATED:
            self.refused += 1
            writer.close()
            return
        self._writers.add(writer)
        try:
            _keepalive(writer)
            self._greeting += 1
            try:
                async with asyncio.timeout(_HELLO_TIMEOUT_S):
                    hello = await read_frame(reader, _HELLO_MAX)
            finally:
                self._greeting -= 1
            token = hello.get("token") if isinstance(hello, dict) else None
            if not isinstance(token, str) or not hmac.compare_digest(
                token.encode(), self._token.encode()
            ):
                return  # no answer at all: nothing tells a prober what it got wrong
            while True:
                ids, min_pos = _request(await read_frame(reader, self.max_frame))
                writer.write(await self._reply(ids, min_pos))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, DirectReadError):
            pass  # the client left, or broke the protocol: close
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _reply(self, ids: list[str], min_pos: str | None) -> bytes:
        self.requests += 1
        try:
            return encode_frame(await self._answer(ids, min_pos))
        except Exception as exc:
            log.warning("direct read of %d ids failed: %r", len(ids), exc)
            return encode_frame({"error": f"{type(exc).__name__}: {exc}"})


def _request(body: Any) -> tuple[list[str], str | None]:
    """(ids, min_pos) of a request frame; DirectReadError if it is not one."""
    if not isinstance(body, dict):
        raise DirectReadError("a request must be an object")
    ids, min_pos = body.get("ids"), body.get("min_pos")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DirectReadError("ids must be a list of strings")
    if min_pos is not None and not isinstance(min_pos, str):
        raise DirectReadError("min_pos must be a string or null")
    return ids, min_pos


class ReadConnection:
    """One authenticated connection to a shard's read server; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, endpoint: dict, *, timeout_s: float = CONNECT_TIMEOUT_S) -> ReadConnection:
        """Connect to `endpoint` (from ShardActor.read_endpoint) and send its token."""
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(endpoint["host"], endpoint["port"])
        _keepalive(writer)
        # No answer to wait for: a wrong token shows as EOF on the first request.
        writer.write(encode_frame({"token": endpoint["token"]}))
        return cls(reader, writer)

    async def get_profiles(
        self, ids: list[str], min_pos: str | None, *, timeout_s: float = REQUEST_TIMEOUT_S
    ) -> list[Any]:
        """What the shard's get_profiles(ids, min_pos) returns.

        RemoteReadError if it raised (the connection stays usable); any other
        exception leaves the connection out of step, and the caller must close it.
        """
        self._writer.write(encode_frame({"ids": ids, "min_pos": min_pos}))
        async with asyncio.timeout(timeout_s):
            await self._writer.drain()
            reply = await read_frame(self._reader)
        if isinstance(reply, list) and len(reply) == len(ids):
            return reply
        if isinstance(reply, dict) and "error" in reply:
            raise RemoteReadError(f"shard failed the read: {reply['error']}")
        raise DirectReadError("the shard's answer does not match the request")

    def close(self) -> None:
        """Close the connection (the server sees EOF)."""
        self._writer.close()


class DirectChannel:
    """A client's way to one shard's read server: found through Ray, dropped when it fails.

    `discover` returns the shard's endpoint (or None while it has none). It is called
    in the background, at most once per `retry_s`, so a read never waits on it: until
    a connection is up, `get_profiles` returns None and the caller reads over Ray. A
    restarted shard listens on a new port with a new token; the failed read that
    reveals it drops the connection and a later one finds the new endpoint.
    """

    def __init__(
        self,
        discover: Callable[[], Awaitable[dict | None]],
        *,
        retry_s: float = 1.0,
        timeout_s: float = REQUEST_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._discover = discover
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._conn: ReadConnection | None = None
        self._next_try = -math.inf
        self.connecting: asyncio.Task | None = None
        self.discoveries = 0
        self._closed = False  # by close(): a read failing after it must not reconnect

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        return self._conn is not None

    async def get_profiles(self, ids: list[str], min_pos: str | None) -> list[Any] | None:
        """get_profiles over the channel; None when there is no working connection.

        RemoteReadError if the shard's get_profiles raised.
        """
        conn = self._conn
        if conn is None:
            self._start_connecting()
            return None
        try:
            return await conn.get_profiles(ids, min_pos, timeout_s=self.timeout_s)
        except RemoteReadError:
            raise  # still in step: the shard answered, with an error
        except (OSError, EOFError, TimeoutError, DirectReadError) as exc:
            log.info("direct read channel failed (%r); reading over Ray", exc)
            self._drop()
            self._start_connecting()  # a restarted shard: find its new endpoint
            return None
        except BaseException:  # cancelled half way: the next answer would be this one's
            self._drop()
            raise

    async def connect(self) -> bool:
        """Find and connect now, throttle or not; True once connected."""
        if self._conn is None and not self._closed:
            if self.connecting is None:
                self._next_try = -math.inf
                self._start_connecting()
            await asyncio.shield(self.connecting)
        return self._conn is not None

    def close(self) -> None:
        """Close for good: the connection, and any finding of the endpoint under way."""
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self.connecting is not None:
            self.connecting.cancel()

    def _start_connecting(self) -> None:
        now = self._clock()
        if self._closed or self.connecting is not None or now < self._next_try:
            return
        self._next_try = now + self.retry_s
        self.discoveries += 1
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            endpoint = await self._discover()
            if endpoint is not None:
                conn = await ReadConnection.open(endpoint)
                if self._closed:  # closed while connecting
                    conn.close()
                else:
                    self._conn = conn
        except Exception as exc:  # Ray or the socket: reads go on over Ray, retried later
            log.info("direct read channel: could not connect (%r)", exc)
        finally:
            self.connecting = None


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """Notice a peer whose machine is gone within about a minute, not two hours."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)

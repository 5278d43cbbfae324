"""Http1Transport against real loopback servers, each scripted for the case at hand."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator

import pytest
import trustme

from engine.content import ContentService, content_config_from_mapping
from engine.content.deadline import BlockFailure
from engine.content.http1 import USER_AGENT, Http1Transport, _split
from engine.content.sources import UpstreamRequest
from tests.content.http.server import Conn, Request, Server, chunked, gzipped, reply

pytestmark = pytest.mark.timeout(20)  # a client waiting for an answer that never comes fails


def get(
    url: str, method: str = "GET", body: bytes | None = None, **headers: str
) -> UpstreamRequest:
    return UpstreamRequest(method, url, headers, body, "key")


async def fails(transport: Http1Transport, request: UpstreamRequest, max_bytes: int = 1000) -> str:
    """The reason the call failed with."""
    with pytest.raises(BlockFailure) as info:
        await transport.send(request, max_bytes=max_bytes)
    return info.value.reason


@pytest.fixture
async def transport() -> AsyncIterator[Http1Transport]:
    client = Http1Transport(max_connections=8)
    yield client
    await client.close()


def first_then_ok(first: bytes, *, hang: bool = False):
    """Answer the first request with `first` (then hang, or close); every later one `ok`."""

    async def answer(request: Request, conn: Conn) -> bool:
        if conn.number > 1:
            conn.writer.write(reply(b"ok"))
            return True
        conn.writer.write(first)
        if hang:
            await conn.hold()
        return False

    return answer


# -- keep-alive and framing ---------------------------------------------------------


async def test_keep_alive_calls_share_one_connection(transport: Http1Transport) -> None:
    async with Server() as server:
        for i in range(20):
            assert await transport.send(get(f"{server.url}/x/{i}"), max_bytes=10) == (200, b"ok")
    assert (server.accepted, len(server.requests)) == (1, 20)


async def test_the_request_goes_out_as_built(transport: Http1Transport) -> None:
    async with Server() as server:
        url = f"{server.url}/echo/a%2Fb?q=x%20y&e=%C3%A9#frag"
        request = get(url, "POST", b'{"a":1}', **{"X-Customer": "ann", "Content-Type": "app/json"})
        await transport.send(request, max_bytes=10)
        await transport.send(get(f"{server.url}/empty", "POST"), max_bytes=10)
    sent, empty = server.requests
    assert (sent.method, sent.target, sent.version) == (
        "POST",
        "/echo/a%2Fb?q=x%20y&e=%C3%A9",
        "HTTP/1.1",
    )
    assert sent.headers == {
        "host": f"127.0.0.1:{server.port}",
        "user-agent": USER_AGENT,
        "accept-encoding": "gzip, deflate",
        "x-customer": "ann",
        "content-type": "app/json",
        "content-length": "7",
    }
    assert sent.body == b'{"a":1}'
    assert empty.headers["content-length"] == "0"


@pytest.mark.parametrize(
    "url, origin, target, host",
    [
        ("http://h.example/p?q=1", ("http", "h.example", 80), "/p?q=1", "h.example"),
        ("https://H.example:8443?x=1#top", ("https", "h.example", 8443), "/?x=1", "H.example:8443"),
        ("HTTP://u:pw@h.example", ("http", "h.example", 80), "/", "h.example"),
        ("http://[::1]:8080/a%2Fb", ("http", "::1", 8080), "/a%2Fb", "[::1]:8080"),
    ],
)
def test_split_url(url: str, origin: tuple, target: str, host: str) -> None:
    assert _split(url) == (origin, target, host)


async def test_chunked_body(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b'{"data": ', b'"split"', b"}"):
            conn.writer.write(chunked(part)[: -len(b"0\r\n\r\n")])
            await conn.writer.drain()
        conn.writer.write(b"0\r\n\r\n")
        return True

    async with Server(answer) as server:
        for _ in range(2):
            assert await transport.send(get(server.url), max_bytes=100) == (
                200,
                b'{"data": "split"}',
            )
    assert server.accepted == 1


def raw_deflate(body: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()


@pytest.mark.parametrize(
    "encoding, encode",
    [("gzip", gzipped), ("deflate", zlib.compress), ("deflate", raw_deflate)],
    ids=["gzip", "deflate", "raw-deflate"],
)
async def test_compressed_body_is_decoded(transport: Http1Transport, encoding, encode) -> None:
    body = b'{"items": [%s]}' % b",".join(b'{"n": %d}' % i for i in range(500))

    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(reply(encode(body), "200 OK", f"Content-Encoding: {encoding}"))
        return True

    async with Server(answer) as server:
        for _ in range(2):
            assert await transport.send(get(server.url), max_bytes=len(body)) == (200, body)
    assert server.accepted == 1


async def test_close_delimited_body(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await conn.writer.drain()
        conn.writer.write(b"the end")
        return False

    async with Server(answer) as server:
        for _ in range(2):
            assert await transport.send(get(server.url), max_bytes=100) == (200, b"until the end")
    assert server.accepted == 2


@pytest.mark.parametrize(
    "version, header",
    [("1.1", "Connection: close"), ("1.0", "Connection: keep-alive"), ("1.0", "X-Other: 1")],
)
async def test_answers_that_end_the_connection_are_not_reused(
    transport: Http1Transport, version: str, header: str
) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(reply(b"ok", "200 OK", header, version=version))
        return True  # the server would go on: the client must not

    async with Server(answer) as server:
        for _ in range(2):
            assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
    assert server.accepted == 2


@pytest.mark.parametrize("method, status", [("HEAD", "200 OK"), ("GET", "204 No Content"),
                                            ("GET", "304 Not Modified")])  # fmt: skip
async def test_answers_without_a_body(transport: Http1Transport, method: str, status: str) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        if request.target == "/next":
            conn.writer.write(reply(b"next"))
        else:  # the length a GET would have had, and no body
            conn.writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 50\r\n\r\n".encode())
        return True

    async with Server(answer) as server:
        code = int(status.split()[0])
        assert await transport.send(get(server.url, method), max_bytes=100) == (code, b"")
        assert await transport.send(get(f"{server.url}/next"), max_bytes=100) == (200, b"next")
    assert server.accepted == 1


async def test_interim_answers_are_skipped(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + reply(b"final"))
        return True

    async with Server(answer) as server:
        assert await transport.send(get(server.url), max_bytes=100) == (200, b"final")
        assert await transport.send(get(server.url), max_bytes=100) == (200, b"final")
    assert server.accepted == 1


async def test_bytes_after_the_answer_close_the_connection(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(reply(b"ok") + b"HTTP/1.1 200 OK\r\n")
        return True

    async with Server(answer) as server:
        for _ in range(2):
            assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
    assert server.accepted == 2


# -- sizes, failures and cancellation ----------------------------------------------

BOMB = gzipped(b"\0" * 10_000_000)  # about 10 kB that decode to 10 MB


@pytest.mark.parametrize(
    "first, hang",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", True),  # declared: nothing read
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(*[b"x" * 400] * 5),
            False,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 5000, False),  # close-delimited
        (reply(BOMB, "200 OK", "Content-Encoding: gzip"), False),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"z" * 70_000 + b"\r\n\r\n", True),  # headers
    ],
    ids=["declared", "chunked", "until-close", "gzip-bomb", "headers"],
)
async def test_too_large(transport: Http1Transport, first: bytes, hang: bool) -> None:
    max_bytes = 1000 if b"Content-Encoding" not in first else 20_000  # the bomb fits undecoded
    async with Server(first_then_ok(first, hang=hang)) as server:
        assert await fails(transport, get(server.url), max_bytes) == "too_large"
        assert await transport.send(get(server.url), max_bytes=max_bytes) == (200, b"ok")
    assert server.accepted == 2


async def test_a_gzip_bomb_is_never_expanded_in_memory(transport: Http1Transport) -> None:
    async with Server(first_then_ok(reply(BOMB, "200 OK", "Content-Encoding: gzip"))) as server:
        tracemalloc.start()
        try:
            assert await fails(transport, get(server.url), max_bytes=20_000) == "too_large"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1_000_000  # it decodes to 10 MB


@pytest.mark.parametrize(
    "first",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        reply(b"not gzip at all", "200 OK", "Content-Encoding: gzip"),
        reply(gzipped(b"x" * 100)[:-12], "200 OK", "Content-Encoding: gzip"),  # truncated
        reply(b"brotli", "200 OK", "Content-Encoding: br"),
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["status-line", "status-code", "chunk-size", "bad-gzip", "short-gzip", "brotli", "101"],
)
async def test_malformed(transport: Http1Transport, first: bytes) -> None:
    async with Server(first_then_ok(first, hang=True)) as server:
        assert await fails(transport, get(server.url)) == "malformed"
        assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
    assert server.accepted == 2


async def test_closed_mid_answer_is_unreachable(transport: Http1Transport) -> None:
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"
    async with Server(first_then_ok(first)) as server:
        assert await fails(transport, get(server.url)) == "unreachable"


async def test_refused_connection_is_unreachable(transport: Http1Transport) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert await fails(transport, get(f"http://127.0.0.1:{port}/x")) == "unreachable"
    assert transport.open_connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x",
        "http:///x",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1/a b",
        "http://h.com\r\nX-Evil:1/",  # would become a header of its own
    ],
)
async def test_urls_it_cannot_call_are_unreachable(transport: Http1Transport, url: str) -> None:
    assert await fails(transport, get(url)) == "unreachable"


async def test_cancelled_mid_body_closes_the_connection(transport: Http1Transport) -> None:
    partial, resume = asyncio.Event(), asyncio.Event()

    async def answer(request: Request, conn: Conn) -> bool:
        if conn.number > 1:
            conn.writer.write(reply(b"fresh"))
            return True
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await conn.writer.drain()
        partial.set()
        await resume.wait()
        conn.writer.write(b"LEFT!")  # the rest; a client reading on would take it for an answer
        return True

    deadlines: list[asyncio.Timeout] = []

    async def call() -> tuple[int, bytes]:
        async with asyncio.timeout(None) as deadline:  # as HttpSource.fetch bounds a call
            deadlines.append(deadline)
            return await transport.send(get(server.url), max_bytes=100)

    async with Server(answer) as server:
        task = asyncio.create_task(call())
        await partial.wait()
        deadlines[0].reschedule(asyncio.get_running_loop().time())  # the deadline passes now
        with pytest.raises(TimeoutError):
            await task
        resume.set()
        assert await transport.send(get(server.url), max_bytes=100) == (200, b"fresh")
    assert server.accepted == 2


# -- stale connections ----------------------------------------------------------------


def closes_on_second_request(request: Request, conn: Conn) -> bool:
    """Conn 1 closes as its second request arrives: its keep-alive timer had just fired."""
    if conn.number == 1 and conn.requests == 2:
        return False
    conn.writer.write(reply(b"ok %d" % conn.number))
    return True


async def test_stale_connection_is_retried_once_for_get(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        return closes_on_second_request(request, conn)

    async with Server(answer) as server:
        assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok 1")
        assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok 2")
    assert (server.accepted, len(server.requests)) == (2, 3)


async def test_stale_connection_is_not_retried_for_post(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        return closes_on_second_request(request, conn)

    async with Server(answer) as server:
        assert await transport.send(get(server.url, "POST"), max_bytes=10) == (200, b"ok 1")
        assert await fails(transport, get(server.url, "POST")) == "unreachable"
    assert (server.accepted, len(server.requests)) == (1, 2)


async def test_fresh_connection_closed_unanswered_is_not_retried(
    transport: Http1Transport,
) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        return False

    async with Server(answer) as server:
        assert await fails(transport, get(server.url)) == "unreachable"
    assert len(server.requests) == 1


async def test_connection_the_server_closed_while_idle(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(reply(b"ok"))
        return False  # closes right after answering, without saying so

    async with Server(answer) as server:
        assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
        await server.wait_closed(0)
        assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
    assert server.accepted == 2


async def test_idle_connections_expire(transport: Http1Transport) -> None:
    loop = asyncio.get_running_loop()
    async with Server() as server:
        await transport.send(get(server.url), max_bytes=10)
        assert transport.close_expired(loop.time() + 29) == 0
        assert transport.close_expired(loop.time() + 31) == 1
        await server.wait_closed(0)
        assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
    assert server.accepted == 2


async def test_the_keep_alive_timer_closes_idle_connections() -> None:
    transport = Http1Transport(max_connections=2, keepalive_s=0.0)
    async with Server() as server:
        await transport.send(get(server.url), max_bytes=10)
        await server.wait_closed(0)  # by the timer: nothing else closes it
        assert transport.open_connections == 0
    await transport.close()


# -- the pool limit -----------------------------------------------------------------


async def test_concurrent_calls_stay_within_the_limit() -> None:
    transport = Http1Transport(max_connections=3)
    gate, waiting = asyncio.Event(), []

    async def answer(request: Request, conn: Conn) -> bool:
        waiting.append(request)
        if len(waiting) >= 3:  # everyone the limit lets in is here
            gate.set()
        await gate.wait()
        conn.writer.write(reply(request.target.encode()))
        return True

    async with Server(answer) as server:
        targets = [f"/n/{i}" for i in range(12)]
        results = await asyncio.gather(
            *(transport.send(get(server.url + t), max_bytes=100) for t in targets)
        )
    await transport.close()
    assert results == [(200, t.encode()) for t in targets]
    assert (server.max_open, server.accepted) == (3, 3)


async def test_idle_connection_gives_its_place_to_another_origin() -> None:
    transport = Http1Transport(max_connections=1)
    async with Server() as one, Server() as two:
        assert await transport.send(get(one.url), max_bytes=10) == (200, b"ok")
        assert await transport.send(get(two.url), max_bytes=10) == (200, b"ok")
        await one.wait_closed(0)
        assert transport.open_connections == 1
    await transport.close()


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    transport = Http1Transport(max_connections=1)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def answer(request: Request, conn: Conn) -> bool:
        if request.target == "/slow":
            arrived.set()
            await release.wait()
        conn.writer.write(reply(b"ok"))
        return True

    async with Server(answer) as server:
        slow = asyncio.create_task(transport.send(get(f"{server.url}/slow"), max_bytes=10))
        queued = asyncio.create_task(transport.send(get(server.url), max_bytes=10))
        await arrived.wait()  # the slow call holds the only connection; `queued` waits
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await slow == (200, b"ok")
        assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
    await transport.close()
    assert server.accepted == 1


async def test_a_waiter_cancelled_as_it_is_woken_passes_its_turn_on() -> None:
    transport = Http1Transport(max_connections=1)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def answer(request: Request, conn: Conn) -> bool:
        if request.target == "/slow":
            arrived.set()
            await release.wait()
        conn.writer.write(reply(request.target.encode()))
        return True

    async def let_go() -> None:
        await arrived.wait()  # by then both queued calls wait for the only connection
        release.set()

    async with Server(answer) as server:
        first = asyncio.create_task(transport.send(get(f"{server.url}/first"), max_bytes=10))
        second = asyncio.create_task(transport.send(get(f"{server.url}/second"), max_bytes=10))
        opener = asyncio.create_task(let_go())
        # Done here, not in a task: the release wakes `first`, cancelled before it runs.
        assert await transport.send(get(f"{server.url}/slow"), max_bytes=10) == (200, b"/slow")
        first.cancel()
        assert await second == (200, b"/second")
        with pytest.raises(asyncio.CancelledError):
            await first
        await opener
    await transport.close()


async def test_closed_transport_refuses_calls(transport: Http1Transport) -> None:
    await transport.close()
    assert await fails(transport, get("http://127.0.0.1:9/x")) == "unavailable"


# -- https ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_with_the_test_ca(ca: trustme.CA) -> None:
    transport = Http1Transport(max_connections=2, ssl_context=client_tls(ca))
    async with Server(tls=server_tls(ca, "127.0.0.1")) as server:
        assert server.url.startswith("https://")
        for _ in range(3):
            assert await transport.send(get(server.url), max_bytes=10) == (200, b"ok")
    await transport.close()
    assert server.accepted == 1


@pytest.mark.parametrize("trusted, name", [(False, "127.0.0.1"), (True, "other.example")])
async def test_https_refuses_certificates_it_cannot_verify(
    ca: trustme.CA, trusted: bool, name: str
) -> None:
    context = client_tls(ca) if trusted else None  # None: the system's CAs only
    transport = Http1Transport(max_connections=2, ssl_context=context)
    async with Server(tls=server_tls(ca, name)) as server:
        assert await fails(transport, get(server.url)) == "unreachable"
    await transport.close()
    assert server.requests == []


def test_the_content_service_uses_it_by_default() -> None:
    service = ContentService(content_config_from_mapping({"http_max_connections": 7}))
    assert isinstance(service.transport, Http1Transport)
    assert service.transport.max_connections == 7


async def test_a_header_value_cannot_start_a_header_of_its_own(transport: Http1Transport) -> None:
    async with Server() as server:
        request = get(server.url + "/x", **{"X-Tier": "gold\r\nX-Evil: 1"})
        assert await fails(transport, request) == "unreachable"
        assert server.requests == []


async def test_a_reset_is_not_the_end_of_a_close_delimited_body(transport: Http1Transport) -> None:
    async def answer(request: Request, conn: Conn) -> bool:
        conn.writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a": 1')
        await conn.writer.drain()
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # closed with linger 0: a reset, not a clean end

    async with Server(answer) as server:
        assert await fails(transport, get(server.url + "/x")) == "unreachable"

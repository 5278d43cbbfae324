"""A real HTTP/1.1 upstream on loopback that behaves as told by the path, and counts calls.

  /fast/...             200 {"data": {...}} at once
  /slow/...?ms=N        the same after N ms
  /hang/...             never answers
  /error/...            500
  /garbage/...          200 with a body that is not JSON
  /echo/...             200 echoing method, target, headers and body

It runs its own event loop in a thread, so the app under test and the test
itself talk to it over real sockets, as they would to a partner's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from urllib.parse import parse_qs, urlsplit

import orjson


class Upstream:
    """The server; `calls[target]` counts requests per path+query, `hits[kind]` per kind."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.version: Counter[str] = Counter()  # bump to change what /fast/<path> answers
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        """Listen on a free loopback port; returns once it accepts connections."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def main() -> None:
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._server.serve_forever()

            loop.run_until_complete(main())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="upstream")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("upstream did not start")
        return self

    def stop(self) -> None:
        """Close every connection (hanging ones too) and the listener."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        def shutdown() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(5)

    def count(self, prefix: str) -> int:
        """Requests whose target starts with `prefix`."""
        return sum(n for target, n in list(self.calls.items()) if target.startswith(prefix))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload = await self._answer(method, target, headers, body)
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (status, len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        self.calls[target] += 1
        parts = urlsplit(target)
        kind = parts.path.split("/")[1] if "/" in parts.path else ""
        self.hits[kind] += 1
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if kind == "slow":
            await asyncio.sleep(int(query.get("ms", "500")) / 1000.0)
        elif kind == "hang":
            await asyncio.Event().wait()
        elif kind == "error":
            return 500, b'{"error": "boom"}'
        elif kind == "garbage":
            return 200, b"<html>this is not json"
        elif kind == "echo":
            echo = {"method": method, "target": target, "headers": headers, "body": body.decode()}
            return 200, orjson.dumps({"data": echo})
        version = self.version[parts.path]
        data = {
            "title": f"<b>{parts.path}</b> v{version}",
            "query": query,
            "version": version,
            "items": [{"name": f"item {i}", "link": f"https://x.example/{i}"} for i in range(2)],
        }
        return 200, orjson.dumps({"data": data})

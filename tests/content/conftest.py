"""Fixtures of the content tests: a real HTTP upstream, and the engine API with the
content routes mounted, served by uvicorn on loopback over in-process shards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from engine.clock import ManualClock
from engine.content import ContentService, content_config_from_mapping
from engine.content.config import ContentConfig
from tests.conftest import LocalShards, serve_app, test_config
from tests.content.upstream import Upstream

CONTENT = {"Authorization": "Bearer dev-content-key"}
ADMIN = {"Authorization": "Bearer dev-admin-key"}
WRITE = {"Authorization": "Bearer dev-write-key"}
FALLBACK_HTML = "<p>Our favourites</p>"


def sources_table(base: str) -> list[dict[str, Any]]:
    """[[content.source]] entries, one per upstream behaviour."""

    def source(name: str, url: str, **extra: Any) -> dict[str, Any]:
        table = {
            "name": name,
            "url": base + url,
            "select": "data",
            "timeout_ms": 1000,  # generous: tests about deadlines set their own
            "ttl_s": 60,
            "stale_s": 600,
            "html": "<h2>{title}</h2>",
            "fallback_html": FALLBACK_HTML,
            "fallback_data": {"title": "fallback"},
        }
        table.update(extra)
        return table

    return [
        source("offers", "/fast/offers?c={customer_id}"),
        source("tiered", "/fast/tiered?tier={traits.tier}&c={customer_id}"),
        source("cart_offers", "/fast/cart_offers?c={customer_id}", vary=["cart_updated"]),
        source("slow", "/slow/s?ms=400&c={customer_id}", timeout_ms=1000),
        source("hanging", "/hang/h?c={customer_id}", timeout_ms=5000),
        source("failing", "/error/e?c={customer_id}"),
        source("garbage", "/garbage/g?c={customer_id}"),
        source("misshaped", "/fast/m?c={customer_id}", select="data.nothing_here"),
        source("optional", "/error/o?c={customer_id}", on_failure="omit"),
        source("burst", "/slow/b?ms=120&c={customer_id}", timeout_ms=1000),
        source(
            "echo",
            "/echo/p?c={customer_id}&email={traits.email}&p={options.placement}",
            method="POST",
            headers={"X-Customer": "{customer_id}"},
            body={"customer": "{customer_id}", "cart": "{cart}", "note": "id={customer_id}"},
            cache=False,
        ),
    ]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@dataclass
class ContentApp:
    """The running app and its handles."""

    base: str
    upstream: Upstream
    clock: ManualClock
    service: ContentService
    config: ContentConfig

    def client(self, **kwargs: Any) -> httpx.Client:
        """A sync client on the app."""
        return httpx.Client(base_url=self.base, timeout=10, **kwargs)

    def seed(self, customer: str, *events: dict) -> None:
        """Ingest `events` for `customer` and wait until its shard has applied them."""
        with self.client() as client:
            if events:
                reply = client.post("/v1/batch", headers=WRITE, json={"batch": list(events)})
                assert reply.status_code == 200, reply.text
            assert client.get(f"/v1/profiles/{customer}", headers=ADMIN).status_code == 200


def event(customer: str, kind: str, /, **props: Any) -> dict:
    """A Segment track message (props may include `name`, unlike tests.factories.track)."""
    return {
        "type": "track",
        "event": kind,
        "userId": customer,
        "messageId": f"m-{uuid.uuid4().hex}",
        "properties": props,
    }


def identify(customer: str, **traits: Any) -> dict:
    """A Segment identify message."""
    return {
        "type": "identify",
        "userId": customer,
        "messageId": f"m-{uuid.uuid4().hex}",
        "traits": traits,
    }


def new_id(prefix: str = "c") -> str:
    """A customer id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def content_app(redis_server: Any, upstream: Upstream) -> Iterator[ContentApp]:
    from engine.api import create_app

    config = test_config()
    url = redis_server.url
    content_config = content_config_from_mapping(
        {
            "product_url": "https://shop.example/p/{product_id}",
            "source": sources_table(upstream.base),
        }
    )
    clock = ManualClock(1_800_000_000.0)
    service = ContentService(content_config, redis_url=url, clock=clock)
    local = LocalShards(config, url)
    held: dict[str, Any] = {}

    async def shards_factory():
        held["shards"] = await local.connect()
        return held["shards"]

    app = create_app(config, url, shards_factory, content=service)
    with serve_app(app) as base:
        yield ContentApp(base, upstream, clock, service, content_config)

"""Open pixel, click redirect and unsubscribe over loopback, into profiles and rules."""

from __future__ import annotations

import dataclasses
import uuid

import httpx
import pytest
import redis
from starlette.applications import Starlette

from engine.api import create_app
from engine.clock import ManualClock
from engine.config import load
from engine.tracking import CLICK, Token, TokenSigner
from engine.tracking.routes import PIXEL, tracking_routes
from tests.conftest import ROOT, LocalShards, serve_app, test_config
from tests.test_triggers_live import MORNING, WRITE, outbox, wait_for

ADMIN = {"Authorization": "Bearer dev-admin-key"}
CLICK_RULE = """
[[rule]]
name = "click_no_purchase"
description = "Clicked through an email but bought nothing within 2 hours"
on = "Email Link Clicked"
cancel_on = ["Order Completed"]

[[rule.step]]
wait = "2h"
template = "click-followup"
"""


@pytest.fixture
def tracked(redis_url: str):
    rules = (*load(ROOT / "config.toml", env={}).rules, (CLICK_RULE, "click.toml"))
    config = dataclasses.replace(test_config(), rules=rules)
    clock = ManualClock(MORNING)
    shards = LocalShards(config, redis_url, clock)
    signer = TokenSigner(config.tracking.tracking_secret, config.tracking.public_url)
    app = create_app(config, redis_url, shards.connect, clock=clock.now)
    with (
        serve_app(app) as base,
        httpx.Client(base_url=base, timeout=10, follow_redirects=False) as client,
    ):
        yield client, clock, signer


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def profile(client: httpx.Client, customer: str) -> dict:
    reply = client.get(f"/v1/profiles/{customer}", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_open_click_and_unsubscribe_reach_the_profile(tracked) -> None:
    client, _, signer = tracked
    cid = f"t-{uuid.uuid4().hex[:8]}"
    client.post("/v1/identify", auth=WRITE, json={"userId": cid, "traits": {"email": "a@b.c"}})

    pixel = client.get(path_of(signer.open_url("s1", cid, rule="cart_abandonment")))
    assert pixel.status_code == 200 and pixel.content == PIXEL
    assert pixel.headers["content-type"] == "image/gif"
    assert "no-store" in pixel.headers["cache-control"]

    dest = "https://shop.example/p/1?utm_source=email&x=a%20b#top"
    link = path_of(signer.click_url("s1", cid, dest, rule="cart_abandonment"))
    # A mail scanner probing links (another send, so dedupe cannot hide a count).
    probe = client.head(path_of(signer.click_url("s0", cid, dest)))
    assert probe.status_code == 302 and probe.headers["location"] == dest
    assert client.head(path_of(signer.open_url("s0", cid))).status_code == 200
    click = client.get(link)
    assert click.status_code == 302 and click.headers["location"] == dest

    seen = profile(client, cid)
    assert seen["email"]["opened"] == 1 and seen["email"]["clicked"] == 1
    scraped = client.get("/metrics", headers=ADMIN).text
    assert 'nudge_email_opens_total{rule="cart_abandonment",variant="-"}' in scraped
    assert 'nudge_email_clicks_total{rule="cart_abandonment",variant="-"}' in scraped
    assert seen["counts"]["Email Link Clicked"] == 1
    assert seen["consent"]["unsubscribed"] is False

    unsub = path_of(signer.unsubscribe_url("s1", cid))
    page = client.get(unsub)
    assert page.status_code == 200 and "<form method=post" in page.text
    assert profile(client, cid)["consent"]["unsubscribed"] is False  # a GET changes nothing
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    one_click = client.post(unsub, content=b"List-Unsubscribe=One-Click", headers=form)
    assert one_click.status_code == 200 and "unsubscribed" in one_click.text
    assert profile(client, cid)["consent"]["unsubscribed"] is True


def test_forged_tampered_and_unsafe_links_are_refused(tracked) -> None:
    client, _, signer = tracked
    good = path_of(signer.click_url("s2", "mallory", "https://shop.example/"))
    forged = TokenSigner("not-our-secret").click_url("s2", "mallory", "https://evil.example/")
    token = good.rsplit("/", 1)[1]
    evil_payload = forged.rsplit("/", 1)[1].split(".")[0]
    for path in (
        "/t/c/" + evil_payload + "." + token.split(".")[1],  # their payload, our signature
        forged,  # a path already: that signer has no base URL
        "/t/c/garbage",
    ):
        reply = client.get(path)
        assert reply.status_code == 400 and "location" not in reply.headers
        assert reply.json()["error"]["field"] == "token"
    script = signer.token(Token(CLICK, "s2", "mallory", url="javascript:alert(1)"))
    assert client.get(f"/t/c/{script}").status_code == 400
    # A bad pixel still draws (no event), a bad unsubscribe link says so.
    assert client.get("/t/o/garbage.gif").content == PIXEL
    assert client.post("/u/garbage").status_code == 400
    assert client.get(f"/t/o/{token}.gif").content == PIXEL  # a click token is no open


def test_a_click_without_purchase_fires_a_rule_and_a_purchase_cancels_it(
    tracked, sync_redis: redis.Redis
) -> None:
    client, clock, signer = tracked
    buyer, browser = f"b-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    for cid in (buyer, browser):
        url = signer.click_url(f"s-{cid}", cid, "https://shop.example/sale")
        assert client.get(path_of(url)).status_code == 302
        profile(client, cid)  # applied
    order = {"userId": buyer, "event": "Order Completed", "properties": {"order_id": "o1"}}
    assert client.post("/v1/track", auth=WRITE, json=order).status_code == 200
    profile(client, buyer)
    clock.advance(2 * 3600 + 1)
    sends = wait_for(lambda: outbox(sync_redis, browser))
    assert [s["rule"] for s in sends] == ["click_no_purchase"]
    assert outbox(sync_redis, buyer) == []


def test_repeated_opens_count_once_a_minute(redis_url: str) -> None:
    events: list[dict] = []

    async def append(batch: list[dict]) -> None:
        events.extend(batch)

    clock = ManualClock(MORNING)
    signer = TokenSigner("k")
    app = Starlette(routes=tracking_routes(signer, append, clock=clock.now))
    with serve_app(app) as base, httpx.Client(base_url=base) as client:
        pixel = signer.open_url("s9", "ann")  # no base URL: a path
        for _ in range(3):
            client.get(pixel)
        clock.advance(60)
        client.get(pixel)
    ids = [e["messageId"] for e in events]
    assert len(ids) == 4 and len(set(ids)) == 2  # the engine's dedupe keeps two opens
    assert {e["event"] for e in events} == {"Email Opened"}
    assert events[0]["properties"] == {"send_id": "s9"} and events[0]["customer"] == "ann"

"""Open pixel, click redirect and unsubscribe over loopback, into profiles and rules."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from starlette.applications import Starlette

from engine.api import create_app
from engine.clock import ManualClock
from engine.config import load
from engine.redis_server import EmbeddedRedis
from engine.routing import shard_for, stream_key
from engine.rules.gates import HOLDOUT, assign
from engine.tracking import CLICK, Token, TokenSigner
from engine.tracking.routes import PIXEL, tracking_routes
from tests.conftest import ROOT, LocalShards, serve_app, test_config
from tests.test_triggers_live import MORNING, WRITE, at, outbox, wait_for

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


# --- behaviours carried over from the unmerged `edges` branch ------------------------------


def stored_events(r: redis.Redis, shards: int = 4) -> list[dict]:
    """Every event in the shards' streams, in stream order per shard."""
    return [
        event
        for index in range(shards)
        for _, fields in r.xrange(stream_key(index))
        for event in orjson.loads(fields[b"e"])
    ]


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_opens_reach_the_profile_once_a_minute_with_their_labels(
    tracked, sync_redis: redis.Redis
) -> None:
    client, clock, signer = tracked
    pixel = path_of(signer.open_url("s5", "opal", rule="cart_abandonment", variant="urgency"))
    for _ in range(3):  # an image proxy, then a reload within the minute
        assert client.get(pixel).content == PIXEL
    assert profile(client, "opal")["email"]["opened"] == 1
    clock.advance(61)
    assert client.get(pixel).content == PIXEL
    email = profile(client, "opal")["email"]
    assert email["opened"] == 2 and email["last_opened"] == MORNING + 61
    first = stored_events(sync_redis)[0]
    assert first["event"] == "Email Opened"
    assert first["properties"] == {
        "send_id": "s5",
        "rule": "cart_abandonment",
        "variant": "urgency",
    }


def test_a_click_records_its_labels_and_encodes_a_non_ascii_destination(
    tracked, sync_redis: redis.Redis
) -> None:
    client, _, signer = tracked
    dest = "https://shop.example/p/1?utm_source=nudge#reviews"
    reply = client.get(path_of(signer.click_url("s6", "cyd", dest, rule="cart", variant="B")))
    assert reply.status_code == 302 and reply.headers["location"] == dest
    [event] = stored_events(sync_redis)
    assert (event["event"], event["customer"]) == ("Email Link Clicked", "cyd")
    assert event["properties"] == {"send_id": "s6", "rule": "cart", "variant": "B", "url": dest}
    # A non-ASCII path is percent-encoded, not refused: the link in the email must work.
    reply = client.get(path_of(signer.click_url("s6", "cyd", "https://shop.example/grün")))
    assert reply.status_code == 302
    assert reply.headers["location"] == "https://shop.example/gr%C3%BCn"


@pytest.mark.parametrize(
    "destination",
    [
        "data:text/html,<script>alert(1)</script>",
        "ftp://files.example/x",
        "//evil.example/",  # scheme-relative: the scheme check must not pass it
        "https:///nohost",
        "/relative/path",
    ],
)
def test_signed_destinations_that_are_not_http_urls_never_redirect(
    tracked, sync_redis: redis.Redis, destination: str
) -> None:
    client, _, signer = tracked
    reply = client.get(f"/t/c/{signer.token(Token(CLICK, 's7', 'dee', url=destination))}")
    assert reply.status_code == 400 and "location" not in reply.headers
    assert reply.json()["error"] == {
        "code": "bad_destination",
        "message": "the link's destination is not an http(s) URL",
        "field": "token",
    }
    assert stored_events(sync_redis) == []


def test_a_line_break_in_a_destination_cannot_inject_a_header(tracked) -> None:
    client, _, signer = tracked
    dest = "https://shop.example/a b\r\nSet-Cookie: owned=1"
    reply = client.get(f"/t/c/{signer.token(Token(CLICK, 's8', 'eli', url=dest))}")
    assert reply.status_code == 302 and "set-cookie" not in reply.headers
    assert reply.headers["location"] == "https://shop.example/a%20b%0D%0ASet-Cookie:%20owned=1"


def test_bad_links_store_nothing(tracked, sync_redis: redis.Redis) -> None:
    client, _, signer = tracked
    forged = TokenSigner("not-our-secret")
    assert client.get(forged.open_url("s9", "mal")).content == PIXEL
    assert client.get(forged.click_url("s9", "mal", "https://shop.example/")).status_code == 400
    assert client.get(forged.unsubscribe_url("s9", "mal")).status_code == 400
    assert client.post(forged.unsubscribe_url("s9", "mal"), headers=FORM).status_code == 400
    # A genuine open token used as an unsubscribe link is no unsubscribe.
    open_as_unsub = path_of(signer.open_url("s9", "mal")).replace("/t/o/", "/u/")[: -len(".gif")]
    reply = client.post(open_as_unsub, content=b"List-Unsubscribe=One-Click", headers=FORM)
    assert reply.status_code == 400
    assert stored_events(sync_redis) == []


def test_one_click_unsubscribe_sent_as_multipart_form_data(tracked) -> None:
    client, clock, signer = tracked
    clock.advance(30)
    url = path_of(signer.unsubscribe_url("s10", "fay"))
    # RFC 8058 says the POST SHOULD be multipart/form-data: what Gmail and Yahoo send.
    reply = client.post(url, files={"List-Unsubscribe": (None, "One-Click")})
    assert reply.status_code == 200, reply.text
    consent = profile(client, "fay")["consent"]
    assert consent["unsubscribed"] is True and consent["unsubscribed_at"] == MORNING + 30


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"List-Unsubscribe=Later", FORM),
        (b"", FORM),
        (b"", {}),
        (b"List-Unsubscribe=One-Click", {"Content-Type": "multipart/form-data; boundary=x"}),
        (  # a part in a charset no codec knows: once a 500
            b"--xx\r\nContent-Disposition: form-data; name=List-Unsubscribe\r\n"
            b"Content-Type: text/plain; charset=bogus\r\n\r\nOne-Click\r\n--xx--\r\n",
            {"Content-Type": "multipart/form-data; boundary=xx"},
        ),
    ],
)
def test_an_unsubscribe_post_without_the_one_click_field_is_refused(
    tracked, sync_redis: redis.Redis, body: bytes, headers: dict
) -> None:
    client, _, signer = tracked
    url = path_of(signer.unsubscribe_url("s11", "gus"))
    reply = client.post(url, content=body, headers=headers)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["field"] == "List-Unsubscribe"
    assert stored_events(sync_redis) == []


def test_unsubscribing_again_after_a_resubscribe_counts(tracked) -> None:
    # The unsubscribe's messageId was one per send: the second click was confirmed,
    # then dropped by the per-customer dedupe, and the customer stayed subscribed.
    client, clock, signer = tracked
    url = path_of(signer.unsubscribe_url("s12", "hal"))
    assert client.post(url, content=b"List-Unsubscribe=One-Click", headers=FORM).status_code == 200
    assert profile(client, "hal")["consent"]["unsubscribed"] is True
    clock.advance(60)
    optin = {"userId": "hal", "traits": {"email_opt_in": True}, "timestamp": at(60)}
    assert client.post("/v1/identify", auth=WRITE, json=optin).status_code == 200
    assert profile(client, "hal")["consent"]["unsubscribed"] is False
    clock.advance(60)
    assert client.post(url, content=b"List-Unsubscribe=One-Click", headers=FORM).status_code == 200
    assert profile(client, "hal")["consent"]["unsubscribed"] is True


def test_unsubscribing_again_within_the_minute_of_a_resubscribe_counts(tracked) -> None:
    # One unsubscribe per send and minute: the second, after a resubscribe in the same
    # minute, passed for the first one's duplicate, and once the consent note in
    # Redis expired (an hour) the customer got email again.
    client, clock, signer = tracked
    url = path_of(signer.unsubscribe_url("s13", "ida"))
    one_click = {"content": b"List-Unsubscribe=One-Click", "headers": FORM}
    assert client.post(url, **one_click).status_code == 200
    clock.advance(10)
    optin = {"userId": "ida", "traits": {"email_opt_in": True}, "timestamp": at(10)}
    assert client.post("/v1/identify", auth=WRITE, json=optin).status_code == 200
    assert profile(client, "ida")["consent"]["unsubscribed"] is False
    clock.advance(10)
    for _ in range(3):  # and hammered again: once more, not three times
        assert client.post(url, **one_click).status_code == 200
    seen = profile(client, "ida")
    assert seen["consent"]["unsubscribed"] is True
    assert seen["counts"]["Unsubscribed"] == 2


def test_an_unsubscribe_posted_again_after_a_signup_opt_in_counts_once(tracked) -> None:
    # Any opt-in (a signup too) gave the next unsubscribe an id of its own, and its
    # repeats in the same minute, no longer after an opt-in, another: counted twice.
    client, _, signer = tracked
    optin = {"userId": "jo", "traits": {"email_opt_in": True}, "timestamp": at(0)}
    assert client.post("/v1/identify", auth=WRITE, json=optin).status_code == 200
    url = path_of(signer.unsubscribe_url("s16", "jo"))
    for _ in range(3):
        reply = client.post(url, content=b"List-Unsubscribe=One-Click", headers=FORM)
        assert reply.status_code == 200
    assert profile(client, "jo")["counts"]["Unsubscribed"] == 1


def test_a_hammered_unsubscribe_link_counts_once_a_minute(tracked) -> None:
    # A random id per POST let a link hammered (a provider's retries) add events
    # without end, pushing the customer's dedupe memory out: an SDK retry of an
    # order then counted twice.
    client, _, signer = tracked
    url = path_of(signer.unsubscribe_url("s14", "jay"))
    for _ in range(5):
        reply = client.post(url, content=b"List-Unsubscribe=One-Click", headers=FORM)
        assert reply.status_code == 200
    assert profile(client, "jay")["counts"] == {"Unsubscribed": 1}


def test_clients_cannot_send_the_engines_own_message_ids(tracked) -> None:
    client, _, _ = tracked
    forged = {"userId": "kay", "event": "Page Viewed", "messageId": "nudge-unsub:s15:1"}
    reply = client.post("/v1/track", auth=WRITE, json=forged)
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "messageId"


def test_a_destination_too_long_to_sign_is_linked_untracked(tracked) -> None:
    # The signer made tokens its own verifier refused (over 4,096 characters): the
    # email's link answered 400.
    client, _, signer = tracked
    long_url = "https://shop.example/p?" + "x" * 5000
    assert signer.click_url("s13", "ivy", long_url) == long_url
    short = signer.click_url("s13", "ivy", "https://shop.example/p?" + "x" * 2000)
    assert client.get(path_of(short), follow_redirects=False).status_code == 302


def test_an_unsubscribe_link_stops_the_pending_cart_email(tracked, sync_redis: redis.Redis) -> None:
    client, clock, signer = tracked
    # Two customers on one shard, neither in the rule's holdout: the shard decides both
    # timers in the same pass, so the other's send proves the unsubscriber's was decided.
    kim, lou = "kim", "lou-2"
    assert shard_for(kim, 4) == shard_for(lou, 4)
    for cid in (kim, lou):
        assert assign("cart-copy-1", cid, (("classic", 50), ("urgency", 50)), 10) != HOLDOUT
        added = {
            "userId": cid,
            "event": "Product Added",
            "timestamp": at(0),
            "properties": {"product_id": "p1", "name": "Wool socks", "price": 9.5},
        }
        assert client.post("/v1/track", auth=WRITE, json=added).status_code == 200
    url = path_of(signer.unsubscribe_url("s-earlier", kim))
    assert client.post(url, content=b"List-Unsubscribe=One-Click", headers=FORM).status_code == 200
    assert profile(client, kim)["consent"]["unsubscribed"] is True
    clock.advance(16 * 60)
    sends = wait_for(lambda: outbox(sync_redis, lou))
    assert [s["rule"] for s in sends] == ["cart_abandonment"]
    assert outbox(sync_redis, kim) == []


def test_with_redis_down_opens_and_clicks_still_answer_but_an_unsubscribe_says_so(
    tmp_path: Path,
) -> None:
    """Losing an open or a click beats a broken image or link; an unsubscribe must not be lost."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    config = test_config()
    shards = LocalShards(config, server.url)
    signer = TokenSigner(config.tracking.tracking_secret)
    app = create_app(config, server.url, shards.connect, clock=ManualClock(MORNING).now)
    try:
        with serve_app(app) as base, httpx.Client(base_url=base, timeout=20) as client:
            assert client.get(signer.open_url("s12", "mo")).content == PIXEL  # Redis is up
            server.stop()
            pixel = client.get(signer.open_url("s13", "mo"))
            assert pixel.status_code == 200 and pixel.content == PIXEL
            dest = "https://shop.example/x"
            click = client.get(signer.click_url("s13", "mo", dest))
            assert click.status_code == 302 and click.headers["location"] == dest
            unsub = client.post(
                signer.unsubscribe_url("s13", "mo"),
                content=b"List-Unsubscribe=One-Click",
                headers=FORM,
            )
            assert unsub.status_code == 503, unsub.text
            error = unsub.json()["error"]
            assert error["code"] == "store_unavailable" and "try again" in error["message"]
            assert "redis" not in error["message"].lower()  # a public page: no internals
    finally:
        server.stop()

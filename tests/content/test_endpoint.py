"""GET/POST /v1/content end to end: real uvicorn, real shards on Redis, real HTTP upstreams.

Upstream behaviours (tests/content/upstream.py): fast, slow beyond the deadline,
hanging, 500 and garbage. The answer always comes within the deadline plus a small
margin, with exactly the late or broken blocks as fallbacks; caching, revalidation
and coalescing are counted on the upstream's side.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from engine.content import signed_url
from tests.content.conftest import ADMIN, CONTENT, WRITE, ContentApp, event, identify, new_id

# Slack over the deadline for uvicorn, JSON and a shared 2-core machine.
MARGIN_S = 0.05
BAD = {"slow": "timeout", "hanging": "timeout", "failing": "http_500", "garbage": "malformed",
       "misshaped": "malformed"}  # fmt: skip
GOOD = ("profile", "cart", "recommendations", "recently_viewed", "offers")


def shopper(app: ContentApp, **traits: object) -> str:
    cid = new_id()
    app.seed(
        cid,
        identify(cid, first_name="Ann", tier="gold", email="a+b@x.io", **traits),
        event(cid, "Product Viewed", product_id="p1", category="Shoes"),
        event(cid, "Product Added", product_id="p2", name="Hat", price=12.5, category="Hats"),
    )
    return cid


def wait_until(check, timeout: float = 5.0) -> None:
    """Poll for a condition another thread makes true (not a sleep for a time window)."""
    stop = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < stop, "condition not met in time"
        time.sleep(0.01)


# 1,000 ms, not 600: the fan-out ends early by twice the loop's recent lag (up to half
# the deadline), so 100 ms of lag ends a 600 ms fan-out at 400 ms, as the 400 ms
# source answers. That is the likely cause of this case failing once in CI.
@pytest.mark.parametrize("deadline_ms", [150, 1000])
def test_late_and_broken_sources_cost_only_their_blocks(
    content_app: ContentApp, deadline_ms: int
) -> None:
    cid = shopper(content_app)
    blocks = ",".join([*GOOD, *BAD, "optional"])
    with content_app.client(headers=CONTENT) as client:
        started = time.perf_counter()
        reply = client.get(f"/v1/content/{cid}?blocks={blocks}&deadline_ms={deadline_ms}")
        elapsed = time.perf_counter() - started
    assert reply.status_code == 200
    assert elapsed < deadline_ms / 1000 + MARGIN_S
    body = reply.json()
    late = dict(BAD)
    if deadline_ms > 400:  # the slow source (400 ms) makes this deadline
        del late["slow"]
        assert body["blocks"]["slow"]["source"] == "upstream"
    fallbacks = {n: b["reason"] for n, b in body["blocks"].items() if b["fallback"]}
    assert fallbacks == late
    assert body["omitted"] == ["optional"]
    assert list(body["blocks"]) == [*GOOD, *BAD]  # in the order asked
    for name in late:
        assert body["blocks"][name]["html"] == "<p>Our favourites</p>"
        assert body["blocks"][name]["data"] == {"title": "fallback"}
    assert set(reply.headers["X-Nudge-Fallback"].split(",")) == {*late, "optional"}
    assert reply.headers["Cache-Control"] == "private, no-cache"


def test_a_source_too_slow_for_one_answer_fills_the_cache_for_the_next(
    content_app: ContentApp,
) -> None:
    cid = shopper(content_app)
    up = content_app.upstream
    with content_app.client(headers=CONTENT) as client:
        first = client.get(f"/v1/content/{cid}?blocks=slow&deadline_ms=100").json()
        assert first["blocks"]["slow"]["reason"] == "timeout"
        wait_until(
            lambda: (
                content_app.service.cache.stats["upstream"]
                and not any(k.startswith("slow:") for k in content_app.service.cache._loading)
            )
        )
        second = client.get(f"/v1/content/{cid}?blocks=slow&deadline_ms=100").json()
    assert second["blocks"]["slow"]["fallback"] is False
    assert second["blocks"]["slow"]["source"] == "cache"
    assert up.count(f"/slow/s?ms=400&c={cid}") == 1


def test_cache_revalidation_counted_upstream(content_app: ContentApp) -> None:
    cid = shopper(content_app)
    up, clock = content_app.upstream, content_app.clock
    target = f"/fast/offers?c={cid}"
    url = f"/v1/content/{cid}?blocks=offers"
    with content_app.client(headers=CONTENT) as client:
        sources = [client.get(url).json()["blocks"]["offers"]["source"] for _ in range(3)]
        assert sources == ["upstream", "cache", "cache"] and up.calls[target] == 1
        up.version["/fast/offers"] += 1
        clock.advance(61)  # past the 60 s TTL, inside the stale window
        stale = client.get(url).json()["blocks"]["offers"]
        assert stale["stale"] is True and stale["source"] == "cache"
        assert stale["age_ms"] >= 61_000 and stale["data"]["version"] == 0
        wait_until(lambda: up.calls[target] == 2)  # one background refresh
        wait_until(lambda: client.get(url).json()["blocks"]["offers"]["stale"] is False)
        fresh = client.get(url).json()["blocks"]["offers"]
    assert fresh["data"]["version"] == 1 and up.calls[target] == 2


async def test_a_burst_for_one_customer_makes_one_upstream_call(content_app: ContentApp) -> None:
    cid = await asyncio.to_thread(shopper, content_app)
    shared_before = content_app.service.stats["answers_shared"]
    url = f"/v1/content/{cid}?blocks=burst,recommendations&deadline_ms=400"
    async with httpx.AsyncClient(base_url=content_app.base, headers=CONTENT, timeout=10) as client:
        # distinct options: twenty different answers, all needing the same upstream value
        distinct = [client.get(f"{url}&recommendations.limit={i}") for i in range(1, 21)]
        identical = [client.get(url) for _ in range(5)]
        replies = await asyncio.gather(*distinct, *identical)
    blocks = [r.json()["blocks"]["burst"] for r in replies]
    assert all(r.status_code == 200 for r in replies)
    assert all(not b["fallback"] for b in blocks)
    assert content_app.upstream.calls[f"/slow/b?ms=120&c={cid}"] == 1
    assert content_app.service.cache.stats["coalesced"] >= 19
    assert content_app.service.stats["answers_shared"] > shared_before  # the identical ones


def test_cart_change_is_seen_at_once_and_etags_revalidate(content_app: ContentApp) -> None:
    cid = shopper(content_app)
    up = content_app.upstream
    url = f"/v1/content/{cid}?blocks=cart,offers,cart_offers"
    with content_app.client(headers=CONTENT) as client:
        first = client.get(url)
        tag = first.headers["ETag"]
        assert first.headers["Cache-Control"] == "private, max-age=5"
        again = client.get(url, headers={"If-None-Match": tag})
        assert again.status_code == 304 and again.headers["ETag"] == tag and again.content == b""
        content_app.seed(cid, event(cid, "Product Added", product_id="p3", name="Scarf",
                                    price=20.0))  # fmt: skip
        changed = client.get(url, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    cart = changed.json()["blocks"]["cart"]["data"]
    assert [i["product_id"] for i in cart["items"]] == ["p3", "p2"] and cart["total"] == 32.5
    # cart_offers varies on cart_updated: asked again; offers does not: still cached
    assert up.calls[f"/fast/cart_offers?c={cid}"] == 2
    assert up.calls[f"/fast/offers?c={cid}"] == 1


def test_html_format_is_the_fragments_joined(content_app: ContentApp) -> None:
    cid = shopper(content_app)
    with content_app.client(headers=CONTENT) as client:
        as_json = client.get(f"/v1/content/{cid}?blocks=profile,cart,offers").json()
        as_html = client.get(f"/v1/content/{cid}?blocks=profile,cart,offers&format=html")
    assert as_html.headers["content-type"] == "text/html; charset=utf-8"
    assert as_html.text == "".join(b["html"] for b in as_json["blocks"].values())
    assert "&lt;b&gt;/fast/offers&lt;/b&gt;" in as_html.text  # upstream markup is escaped
    assert '<span class="nudge-first-name">Ann</span>' in as_html.text


def test_keys_and_signed_urls(content_app: ContentApp) -> None:
    cid = shopper(content_app)
    path = f"/v1/content/{cid}"
    now = int(time.time())
    with content_app.client() as client:
        assert client.get(path).status_code == 401
        assert client.get(path, headers=WRITE).status_code == 403
        assert client.get(path, headers=CONTENT).status_code == 200
        assert client.get(path, headers=ADMIN).status_code == 200
        signed = signed_url("dev-content-key", path, {"blocks": "cart"}, expires=now + 60)
        assert client.get(signed).json()["blocks"]["cart"]["data"]["total"] == 12.5
        other = signed.replace(cid, "someone-else")
        assert client.get(other).json()["error"]["code"] == "bad_signature"
        expired = signed_url("dev-content-key", path, {"blocks": "cart"}, expires=now - 1)
        reply = client.get(expired)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "signature_expired"
        # a content key reads content and nothing else
        assert client.get(f"/v1/profiles/{cid}", headers=CONTENT).status_code == 403
        track = event(cid, "Product Viewed")
        assert client.post("/v1/track", headers=CONTENT, json=track).status_code == 403


def test_post_options_reach_the_source_request(content_app: ContentApp) -> None:
    cid = shopper(content_app)
    body = orjson.dumps({"blocks": ["echo"], "options": {"echo": {"placement": "hero & co"}}})
    path = f"/v1/content/{cid}"
    with content_app.client() as client:
        signed = signed_url("dev-content-key", path, {}, expires=int(time.time()) + 60,
                            method="POST", body=body)  # fmt: skip
        reply = client.post(signed, content=body)
        assert reply.status_code == 200, reply.text
        tampered = client.post(signed, content=body.replace(b"echo", b"cart", 1))
        assert tampered.status_code == 401
    echo = reply.json()["blocks"]["echo"]["data"]
    assert echo["method"] == "POST"
    assert echo["target"] == f"/echo/p?c={cid}&email=a%2Bb%40x.io&p=hero%20%26%20co"
    assert echo["headers"]["x-customer"] == cid
    sent = orjson.loads(echo["body"])
    assert sent["cart"]["p2"]["price"] == 12.5 and sent["note"] == f"id={cid}"


@pytest.mark.parametrize(
    ("path", "status", "field"),
    [
        ("/v1/content/nobody-{id}", 404, "customer_id"),
        ("/v1/content/{id}?blocks=cart,weather", 400, "blocks[1]"),
        ("/v1/content/{id}?deadline_ms=60000", 400, "deadline_ms"),
        ("/v1/content/{id}?format=pdf", 400, "format"),
    ],
)
def test_errors_are_json_and_name_the_field(
    content_app: ContentApp, path: str, status: int, field: str
) -> None:
    with content_app.client(headers=CONTENT) as client:
        reply = client.get(path.format(id=new_id()))
    assert reply.status_code == status and reply.json()["error"]["field"] == field


def test_body_method_and_format_edges_answer_as_http_says(content_app: ContentApp) -> None:
    cid = shopper(content_app)
    path = f"/v1/content/{cid}"
    with content_app.client(headers=CONTENT) as client:
        bad = client.post(path, content=b"{not json")
        big = client.post(path, content=b" " * 70_000)
        put = client.put(path, content=b"{}")
        again = client.put(path, content=b"{}")  # a shared reply must not grow per request
        html = client.get(path + "?blocks=cart&format=html")
        head = client.head(path + "?blocks=cart&format=html")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    assert put.status_code == 405 and put.json()["error"]["code"] == "method_not_allowed"
    assert put.headers["allow"] == "GET, HEAD, POST"
    assert again.headers.get_list("content-length") == [str(len(again.content))]
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "Hat" in html.text and int(html.headers["content-length"]) == len(html.content)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == html.headers["etag"]

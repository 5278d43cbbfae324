"""Delivery on the real stack: API -> shard -> rules -> outbox -> dispatcher -> ESP server."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from datetime import UTC, datetime
from html import unescape

import httpx
import orjson
import pytest
import redis

from engine.clock import ManualClock
from engine.delivery.config import EspConfig
from engine.delivery.ledger import counts_key, dlq_key, record_key
from engine.routing import shard_for
from engine.rules.gates import assign
from engine.store import outbox_key
from engine.tracking import TokenSigner
from tests.delivery.conftest import ADMIN, WRITE, delivery_config, engine, put_send, wait_for
from tests.delivery.servers import Hook, smtp_server

MORNING = datetime(2026, 11, 18, 10, 0, tzinfo=UTC).timestamp()
ARMS = (("classic", 50.0), ("urgency", 50.0))


def at(seconds: float) -> str:
    return datetime.fromtimestamp(MORNING + seconds, UTC).isoformat()


def mailable(prefix: str) -> str:
    """A customer id the cart experiment does not hold out (so an email is due)."""
    for n in range(100):
        if assign("cart-copy-1", f"{prefix}{n}", ARMS, 10) != "holdout":
            return f"{prefix}{n}"
    raise AssertionError("no customer outside the holdout")


def identify(client: httpx.Client, customer: str, **traits: object) -> None:
    msg = {
        "userId": customer,
        "traits": {"email": f"{customer}@example.com", **traits},
        "timestamp": at(-60),
    }
    assert client.post("/v1/identify", auth=WRITE, json=msg).status_code == 200


def add_to_cart(client: httpx.Client, customer: str, when: float = 0) -> None:
    msg = {
        "userId": customer,
        "event": "Product Added",
        "timestamp": at(when),
        "properties": {
            "product_id": "sku-1",
            "name": "Wool socks",
            "price": 9.5,
            "url": "https://shop.example/p/sku-1",
        },
    }
    assert client.post("/v1/track", auth=WRITE, json=msg).status_code == 200


def test_cart_recovery_email_arrives_by_smtp_with_items_and_signed_links(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    clock = ManualClock(MORNING)
    ann = mailable("ann")
    with smtp_server() as (port, inbox):
        smtp = EspConfig(name="default", kind="smtp", host="127.0.0.1", port=port)
        with engine(redis_url, delivery_config(smtp), clock=clock) as (client, _, config):
            identify(client, ann, first_name="Ann")
            add_to_cart(client, ann)
            client.get(f"/v1/profiles/{ann}", headers=ADMIN)  # applied
            clock.advance(14 * 60)
            time.sleep(0.2)
            assert inbox.messages == []  # not before the 15 minutes
            clock.advance(2 * 60)
            assert wait_for(lambda: inbox.messages)
            time.sleep(0.3)
            summary = client.get("/v1/delivery", headers=ADMIN).json()
    assert len(inbox.messages) == 1
    message = inbox.messages[0]
    assert inbox.envelopes[0][1] == [f"{ann}@example.com"]
    assert message["To"].addresses[0].addr_spec == f"{ann}@example.com"
    assert "Ann" in message["Subject"] or "cart" in message["Subject"].lower()
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # Verbatim on the wire, as mail clients read it (not folded into encoded words).
    assert b"\r\nList-Unsubscribe: <http://127.0.0.1:8000/u/" in inbox.raw[0]
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    assert "Wool socks" in html and "9.50" in html and "Wool socks" in text
    assert 'style="' in html and "<style" not in html  # CSS inlined

    signer = TokenSigner(config.tracking.tracking_secret, config.tracking.public_url)
    send_id = message["X-Nudge-Send-Id"]
    clicks = [unescape(u) for u in re.findall(r'href="([^"]*/t/c/[^"]+)"', html)]
    assert clicks
    targets = set()
    for url in clicks:
        token = signer.verify(url.rsplit("/t/c/", 1)[1], "c")
        assert token.send_id == send_id and token.customer == ann
        assert token.rule == "cart_abandonment"
        targets.add(token.url)
    assert "https://shop.example/p/sku-1" in targets
    unsubscribe = message["List-Unsubscribe"].strip("<>")
    assert signer.verify(unsubscribe.rsplit("/u/", 1)[1], "u").customer == ann
    assert unsubscribe in html
    pixel = re.search(r'src="([^"]*/t/o/([^"]+)\.gif)"', html)
    assert pixel and signer.verify(pixel.group(2), "o").send_id == send_id

    [row] = [r for r in summary["outcomes"] if r["rule"] == "cart_abandonment"]
    assert row["sent"] == 1 and row["variant"] in ("classic", "urgency")
    record = orjson.loads(sync_redis.get(record_key(shard_for(ann, 4), send_id)))
    assert record["state"] == "sent" and record["attempts"] == 1
    assert sync_redis.xlen(outbox_key(shard_for(ann, 4))) == 0  # acknowledged and removed


def test_an_order_inside_the_window_means_no_email(redis_url: str) -> None:
    clock = ManualClock(MORNING)
    bob = mailable("bob")
    with smtp_server() as (port, inbox):
        smtp = EspConfig(name="default", kind="smtp", host="127.0.0.1", port=port)
        with engine(redis_url, delivery_config(smtp), clock=clock) as (client, _, _config):
            identify(client, bob)
            add_to_cart(client, bob)
            order = {
                "userId": bob,
                "event": "Order Completed",
                "timestamp": at(300),
                "properties": {"order_id": "o1", "revenue": 9.5},
            }
            assert client.post("/v1/track", auth=WRITE, json=order).status_code == 200
            client.get(f"/v1/profiles/{bob}", headers=ADMIN)
            clock.advance(48 * 3600)
            time.sleep(0.4)
            outcomes = client.get("/v1/delivery", headers=ADMIN).json()["outcomes"]
    assert inbox.messages == []
    assert not [r for r in outcomes if r["rule"] == "cart_abandonment"]


def test_an_esp_answering_500_then_200_delivers_once(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    hook = Hook(secret="s3cret", script=[(500, {})])
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="s3cret", render=True)
        with engine(redis_url, delivery_config(esp), rules=False) as (client, _, _config):
            identify(client, "cy", first_name="Cy")
            client.get("/v1/profiles/cy", headers=ADMIN)
            put_send(sync_redis, "cy", "send-cy", "hook")
            assert wait_for(lambda: hook.accepted)
            time.sleep(0.3)
            outcomes = client.get("/v1/delivery", headers=ADMIN).json()["outcomes"]
    assert [r["key"] for r in hook.requests] == ["send-cy", "send-cy"]
    assert all(r["verified"] for r in hook.requests)
    assert list(hook.accepted) == ["send-cy"]
    body = hook.accepted["send-cy"]
    assert body["to"]["email"] == "cy@example.com" and body["message"]["subject"]
    assert body["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert outcomes == [{"rule": "manual", "variant": None, "failed": 1, "sent": 1}]


def test_unsubscribed_after_the_decision_is_suppressed_at_send_time(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    hook = Hook(secret="k")
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        with engine(redis_url, delivery_config(esp), rules=False) as (client, _, _config):
            identify(client, "dee")
            unsub = {"userId": "dee", "event": "Unsubscribed", "timestamp": at(0)}
            assert client.post("/v1/track", auth=WRITE, json=unsub).status_code == 200
            client.get("/v1/profiles/dee", headers=ADMIN)
            put_send(sync_redis, "dee", "send-dee", "hook")
            put_send(sync_redis, "dee", "send-dee-holdout", "hook", deliver=False)
            rows = wait_for(
                lambda: (
                    client.get("/v1/delivery", headers=ADMIN).json()["outcomes"]
                    if sync_redis.xlen(outbox_key(shard_for("dee", 4))) == 0
                    else None
                )
            )
    assert hook.requests == []
    assert rows == [{"rule": "manual", "variant": None, "holdout": 1, "suppressed": 1}]
    record = orjson.loads(sync_redis.get(record_key(shard_for("dee", 4), "send-dee")))
    assert record["detail"] == "unsubscribed"


def test_a_recent_profile_copy_on_the_send_stands_in_for_the_live_profile(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    hook = Hook(secret="k")
    copy = {"id": "ivy", "traits": {"email": "copy@example.com"}, "consent": {}}
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k", render=True)
        delivery = delivery_config(esp, snapshot_max_age_ms=60_000)
        with engine(redis_url, delivery, rules=False) as (client, _, _config):
            identify(client, "ivy")  # live: ivy@example.com
            client.get("/v1/profiles/ivy", headers=ADMIN)
            now = time.time()
            put_send(sync_redis, "ivy", "send-fresh", "hook", profile=copy, profile_at=now)
            put_send(sync_redis, "ivy", "send-old", "hook", profile=copy, profile_at=now - 120)
            put_send(sync_redis, "ivy", "send-dead", "nowhere", profile=copy, profile_at=now)
            assert wait_for(lambda: len(hook.accepted) == 2)
            assert wait_for(lambda: sync_redis.xlen(dlq_key(shard_for("ivy", 4))))
            [letter] = client.get("/v1/dlq", headers=ADMIN).json()["dead_letters"]
    # Young: the copy is used, no shard call. Old: the live profile is read.
    assert hook.accepted["send-fresh"]["to"]["email"] == "copy@example.com"
    assert hook.accepted["send-old"]["to"]["email"] == "ivy@example.com"
    # A dead letter keeps no copy: its replay is late by definition, so it reads live.
    assert "profile" not in letter["send"] and "profile_at" not in letter["send"]


def _detail(sync_redis: redis.Redis, customer: str, send_id: str) -> str | None:
    raw = sync_redis.get(record_key(shard_for(customer, 4), send_id))
    return orjson.loads(raw).get("detail") if raw else None  # "sending" has none


def test_consent_stored_after_the_send_left_decides_over_its_profile_copy(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    hook = Hook(secret="k")
    subscribed = {"traits": {"email": "copy@example.com"}, "consent": {}}
    withdrawn = {**subscribed, "consent": {"unsubscribed": True}}
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k", render=True)
        delivery = delivery_config(esp, snapshot_max_age_ms=60_000)
        with engine(redis_url, delivery, rules=False) as (client, _, _config):
            for customer in ("eve", "fox", "gil"):
                identify(client, customer)
            unsub = {"userId": "eve", "event": "Unsubscribed", "timestamp": at(0)}
            assert client.post("/v1/track", auth=WRITE, json=unsub).status_code == 200
            assert client.delete("/v1/profiles/fox", headers=ADMIN).status_code == 200
            identify(client, "gil", unsubscribed=True)
            identify(client, "gil", email_opt_in=True)  # back in: the live profile says so
            client.get("/v1/profiles/gil", headers=ADMIN)
            now = time.time()
            # Each send left its shard "before" the change: its copy does not show it.
            put_send(sync_redis, "eve", "send-eve", "hook", profile=subscribed, profile_at=now)
            put_send(sync_redis, "fox", "send-fox", "hook", profile=subscribed, profile_at=now)
            put_send(sync_redis, "gil", "send-gil", "hook", profile=withdrawn, profile_at=now)
            assert wait_for(
                lambda: all(
                    _detail(sync_redis, c, f"send-{c}") is not None for c in ("eve", "fox", "gil")
                )
            )
    assert _detail(sync_redis, "eve", "send-eve") == "unsubscribed"
    assert _detail(sync_redis, "fox", "send-fox") == "erased"
    # An opt-in since the copy was taken sends a live read to the shard, which has it.
    assert list(hook.accepted) == ["send-gil"]
    assert hook.accepted["send-gil"]["to"]["email"] == "gil@example.com"


def test_an_unsubscribe_during_a_retry_backoff_stops_the_next_attempt(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    hook = Hook(secret="k", script=[(429, {"Retry-After": "2"})])
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        with engine(redis_url, delivery_config(esp), rules=False) as (client, _, _config):
            identify(client, "hal")
            client.get("/v1/profiles/hal", headers=ADMIN)
            put_send(sync_redis, "hal", "send-hal", "hook")
            assert wait_for(lambda: hook.requests)  # the first attempt was refused
            unsub = {"userId": "hal", "event": "Unsubscribed", "timestamp": at(0)}
            assert client.post("/v1/track", auth=WRITE, json=unsub).status_code == 200
            assert wait_for(lambda: _detail(sync_redis, "hal", "send-hal"), timeout=10)
            left = sync_redis.xlen(outbox_key(shard_for("hal", 4)))
    assert len(hook.requests) == 1 and not hook.accepted
    assert _detail(sync_redis, "hal", "send-hal") == "unsubscribed"
    assert left == 0  # the entry, and any profile copy it carried, left the outbox


def test_esp_down_for_good_dead_letters_then_dlq_replay_delivers(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    from engine.delivery.cli import dlq_main

    hook = Hook(secret="k", script=[(503, {})] * 4)
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        delivery = delivery_config(esp, max_attempts=4, breaker_failures=10)
        with engine(redis_url, delivery, rules=False) as (client, _, _config):
            identify(client, "eve")
            client.get("/v1/profiles/eve", headers=ADMIN)
            put_send(sync_redis, "eve", "send-eve", "hook")
            shard = shard_for("eve", 4)
            assert wait_for(lambda: sync_redis.xlen(dlq_key(shard)))
            assert len(hook.requests) == 4 and hook.accepted == {}
            letters = client.get("/v1/dlq", headers=ADMIN).json()["dead_letters"]
            assert len(letters) == 1 and "HTTP 503" in letters[0]["error"]
            assert letters[0]["attempts"] == 4 and letters[0]["send"]["send_id"] == "send-eve"
            shown = client.get(f"/v1/dlq/{letters[0]['id']}", headers=ADMIN).json()
            assert shown["send"]["customer"] == "eve"
            # The ESP recovers (its script is used up); replay through the CLI.
            assert dlq_main(["--redis-url", redis_url, "replay", "--all"]) == 0
            assert wait_for(lambda: hook.accepted)
            time.sleep(0.2)
            assert sync_redis.xlen(dlq_key(shard)) == 0
            outcomes = client.get("/v1/delivery", headers=ADMIN).json()["outcomes"]
    assert list(hook.accepted) == ["send-eve"] and len(hook.requests) == 5
    assert outcomes == [
        {
            "rule": "manual",
            "variant": None,
            "failed": 4,
            "dead_lettered": 1,
            "replayed": 1,
            "sent": 1,
        }
    ]
    assert sync_redis.hget(counts_key(shard), "manual\x1f\x1fsent") == b"1"


def test_a_429_retry_after_is_honoured(redis_url: str, sync_redis: redis.Redis) -> None:
    hook = Hook(secret="k", script=[(429, {"Retry-After": "1"})])
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        with engine(redis_url, delivery_config(esp), rules=False) as (client, _, _config):
            identify(client, "fay")
            client.get("/v1/profiles/fay", headers=ADMIN)
            put_send(sync_redis, "fay", "send-fay", "hook")
            assert wait_for(lambda: hook.accepted)
    first, second = hook.requests
    # The backoff alone would be at most 10 ms; the server asked for a second.
    assert second["at"] - first["at"] >= 1.0
    assert list(hook.accepted) == ["send-fay"]


def test_a_send_to_an_unconfigured_esp_is_dead_lettered_with_the_reason(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    with engine(redis_url, delivery_config(), rules=False) as (client, _, _config):
        identify(client, "gus")
        client.get("/v1/profiles/gus", headers=ADMIN)
        put_send(sync_redis, "gus", "send-gus", "default")
        assert wait_for(lambda: sync_redis.xlen(dlq_key(shard_for("gus", 4))))
        [letter] = client.get("/v1/dlq", headers=ADMIN).json()["dead_letters"]
    assert "no ESP named 'default'" in letter["error"]


@pytest.mark.parametrize("ids", [["9:1-0"], ["nonsense"]])
def test_dlq_errors_are_json_404s(redis_url: str, ids: list[str]) -> None:
    with engine(redis_url, delivery_config(), rules=False) as (client, _, _config):
        reply = client.post("/v1/dlq/replay", headers=ADMIN, json={"ids": ids})
        assert reply.status_code == 404 and reply.json()["error"]["field"] == "id"
        assert (
            client.get("/v1/dlq", headers={"Authorization": "Bearer dev-write-key"}).status_code
            == 403
        )


def test_smtp_with_starttls_and_auth(redis_url: str, sync_redis: redis.Redis, tmp_path) -> None:
    with smtp_server(tls_dir=str(tmp_path), login=("nudge", "pw")) as (port, inbox):
        good = EspConfig(
            name="mx",
            kind="smtp",
            host="127.0.0.1",
            port=port,
            starttls=True,
            validate_certs=False,
            username="nudge",
            password="pw",
        )
        bad = dataclasses.replace(good, name="mx-bad", password="wrong")
        delivery = delivery_config(good, bad)
        with engine(redis_url, delivery, rules=False) as (client, _, _config):
            identify(client, "hal", first_name="Hal")
            client.get("/v1/profiles/hal", headers=ADMIN)
            put_send(sync_redis, "hal", "send-hal", "mx")
            put_send(sync_redis, "hal", "send-hal-bad", "mx-bad")
            assert wait_for(lambda: inbox.messages)
            assert wait_for(lambda: sync_redis.xlen(dlq_key(shard_for("hal", 4))))
            [letter] = client.get("/v1/dlq", headers=ADMIN).json()["dead_letters"]
    assert len(inbox.messages) == 1 and inbox.messages[0]["X-Nudge-Send-Id"] == "send-hal"
    assert letter["send"]["send_id"] == "send-hal-bad" and "535" in letter["error"]
    assert letter["attempts"] == 1  # a refused login is permanent: no retries


def test_sendgrid_wire_format_is_accepted_by_a_validating_server(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    from tests.conftest import serve_app
    from tests.delivery.servers import FakeSendGrid

    fake = FakeSendGrid(api_key="SG.test")
    with serve_app(fake.app()) as base:
        esp = EspConfig(name="sg", kind="sendgrid", url=base + "/v3/mail/send", api_key="SG.test")
        wrong_key = dataclasses.replace(esp, name="sg-bad", api_key="SG.wrong")
        with engine(redis_url, delivery_config(esp, wrong_key), rules=False) as (client, _, _c):
            identify(client, "ivy", first_name="Ivy")
            client.get("/v1/profiles/ivy", headers=ADMIN)
            put_send(sync_redis, "ivy", "send-ivy", "sg")
            put_send(sync_redis, "ivy", "send-ivy-2", "sg-bad")
            assert wait_for(lambda: fake.accepted)
            assert wait_for(lambda: sync_redis.xlen(dlq_key(shard_for("ivy", 4))))
            [letter] = client.get("/v1/dlq", headers=ADMIN).json()["dead_letters"]
    assert fake.rejected == []
    [body] = fake.accepted
    assert body["personalizations"][0]["to"][0]["email"] == "ivy@example.com"
    assert body["personalizations"][0]["custom_args"]["send_id"] == "send-ivy"
    assert "Ivy" in body["subject"]
    assert "HTTP 401" in letter["error"] and letter["send"]["send_id"] == "send-ivy-2"


def test_entries_a_vanished_consumer_held_are_claimed_and_delivered(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    from engine.delivery.ledger import GROUP

    hook = Hook(secret="k")
    shard = shard_for("jo", 4)
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        delivery = delivery_config(esp, claim_idle_ms=200)
        sync_redis.xgroup_create(outbox_key(shard), GROUP, id="0", mkstream=True)
        put_send(sync_redis, "jo", "send-jo", "hook")
        # A consumer that read the entry and vanished (a dispatcher removed from the pool).
        taken = sync_redis.xreadgroup(GROUP, "dispatcher-9", {outbox_key(shard): ">"})
        assert len(taken[0][1]) == 1
        with engine(redis_url, delivery, rules=False) as (client, _, _config):
            identify(client, "jo")
            client.get("/v1/profiles/jo", headers=ADMIN)
            assert wait_for(lambda: hook.accepted)
            time.sleep(0.2)
    assert list(hook.accepted) == ["send-jo"] and len(hook.requests) == 1
    assert sync_redis.xpending(outbox_key(shard), GROUP)["pending"] == 0


def test_rate_limit_beyond_the_burst(redis_url: str, sync_redis: redis.Redis) -> None:
    hook = Hook(secret="k")
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k", rate_per_s=5)
        with engine(redis_url, delivery_config(esp, dispatchers=1), rules=False) as (
            client,
            _,
            _config,
        ):
            identify(client, "lou")
            client.get("/v1/profiles/lou", headers=ADMIN)
            for n in range(10):
                put_send(sync_redis, "lou", f"send-lou-{n}", "hook")
            assert wait_for(lambda: len(hook.accepted) == 10)
    times = sorted(r["at"] for r in hook.requests)
    # Burst of 5 at once, then one every 0.2 s: the tenth no sooner than 1 s after the first.
    assert times[-1] - times[0] >= 0.95


async def test_a_profile_read_that_fails_is_retried_then_dead_lettered(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    from actors.dispatcher import DispatcherActor
    from tests.conftest import test_config

    hook = Hook(secret="k")
    calls: dict[str, int] = {}

    async def flaky(customer: str) -> dict | None:
        calls[customer] = calls.get(customer, 0) + 1
        if customer == "never" or calls[customer] == 1:
            raise RuntimeError("shard unreachable")
        return {"id": customer, "traits": {"email": f"{customer}@example.com"}}

    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        config = dataclasses.replace(test_config(), delivery=delivery_config(esp))
        dispatcher = DispatcherActor(0, config, redis_url, profiles=flaky, autostart=False)
        await dispatcher.start()
        put_send(sync_redis, "once", "send-once", "hook")
        put_send(sync_redis, "never", "send-never", "hook")
        for _ in range(500):
            if hook.accepted and sync_redis.xlen(dlq_key(shard_for("never", 4))):
                break
            await asyncio.sleep(0.02)
        await dispatcher.stop()
    assert list(hook.accepted) == ["send-once"] and calls["once"] == 2
    [(_, fields)] = sync_redis.xrange(dlq_key(shard_for("never", 4)))
    assert b"shard unreachable" in fields[b"d"] and calls["never"] == 5


def test_dispatchers_recreate_their_group_after_redis_is_emptied(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    hook = Hook(secret="k")
    with hook.serve() as url:
        esp = EspConfig(name="hook", kind="webhook", url=url, secret="k")
        with engine(redis_url, delivery_config(esp), rules=False) as (client, _, _config):
            identify(client, "max")
            client.get("/v1/profiles/max", headers=ADMIN)
            sync_redis.delete(outbox_key(shard_for("max", 4)))  # the group goes with it
            time.sleep(0.5)
            put_send(sync_redis, "max", "send-max", "hook")
            assert wait_for(lambda: hook.accepted)
    assert list(hook.accepted) == ["send-max"]

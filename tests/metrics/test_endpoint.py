"""/metrics and the console's JSON on the real API, real Redis and in-process shards:
the numbers move when events, sends and content calls happen."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.api import create_app
from engine.clock import ManualClock
from engine.config import MetricsConfig, load
from engine.metrics.collect import known_series
from engine.routing import shard_for
from engine.store import outbox_key
from tests.conftest import ROOT, LocalShards, serve_app, test_config

WRITE = ("dev-write-key", "")
ADMIN = {"Authorization": "Bearer dev-admin-key"}
CONTENT = {"Authorization": "Bearer dev-content-key"}
MORNING = datetime(2026, 11, 18, 10, 0, tzinfo=UTC).timestamp()


def at(seconds: float) -> str:
    return datetime.fromtimestamp(MORNING + seconds, UTC).isoformat()


@pytest.fixture
def engine(redis_url: str):
    rules = load(ROOT / "config.toml", env={}).rules
    config = dataclasses.replace(test_config(), rules=rules)
    clock = ManualClock(MORNING)
    shards = LocalShards(config, redis_url, clock)
    with (
        serve_app(create_app(config, redis_url, shards.connect)) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        yield client, clock


def scrape(client: httpx.Client) -> dict[tuple, float]:
    reply = client.get("/metrics", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def wait_until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def test_metrics_wants_an_admin_key(engine) -> None:
    client, _ = engine
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=CONTENT).status_code == 403
    assert client.get("/metrics", auth=WRITE).json()["error"]["code"] == "forbidden"


def test_metrics_can_be_open(redis_url: str) -> None:
    config = dataclasses.replace(test_config(), metrics=MetricsConfig(metrics_auth="open"))
    shards = LocalShards(config, redis_url)
    with serve_app(create_app(config, redis_url, shards.connect)) as base:
        reply = httpx.get(base + "/metrics", timeout=10)
    assert reply.status_code == 200 and "nudge_shard_up" in reply.text


def test_metrics_move_with_events_sends_and_content(engine) -> None:
    client, clock = engine
    before = scrape(client)
    identify = {"userId": "ann", "traits": {"first_name": "Ann"}, "timestamp": at(-60)}
    assert client.post("/v1/identify", auth=WRITE, json=identify).status_code == 200
    added = {
        "userId": "ann",
        "event": "Product Added",
        "timestamp": at(0),
        "properties": {"product_id": "sku-1", "name": "Wool socks", "price": 9.5},
    }
    batch = {"batch": [{**added, "type": "track"}, {"type": "track", "event": "x"}]}
    assert client.post("/v1/batch", auth=WRITE, json=batch).json()["accepted"] == 1
    assert client.post("/v1/track", auth=("bad-key", ""), json=added).status_code == 401
    assert client.get("/v1/content/ann?blocks=profile,cart", headers=CONTENT).status_code == 200
    assert client.get("/v1/content/nobody?blocks=cart", headers=CONTENT).status_code == 404

    clock.advance(16 * 60)  # the cart reminder falls due
    assert wait_until(
        lambda: (
            total(scrape(client), "nudge_triggers_total", rule="cart_abandonment")
            > total(before, "nudge_triggers_total", rule="cart_abandonment")
        )
    )
    order = {"userId": "ann", "event": "Order Completed", "timestamp": at(40 * 60)}
    assert client.post("/v1/track", auth=WRITE, json=order).status_code == 200
    client.get("/v1/profiles/ann", headers=ADMIN)  # applied
    after = wait_until(
        lambda: (
            (s := scrape(client))
            and total(s, "nudge_funnel_conversions_total", rule="cart_abandonment", within="1h")
            and s
        )
    )
    assert after, "the order after the reminder was not counted as a conversion"

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("nudge_ingest_events_total", type="identify", outcome="accepted") == 1
    assert delta("nudge_ingest_events_total", type="track", outcome="accepted") == 2
    assert delta("nudge_ingest_rejects_total", reason="missing_id") == 1
    assert delta("nudge_ingest_rejects_total", reason="unauthorized") == 1
    assert delta("nudge_ingest_seconds_count") == 3
    assert delta("nudge_shard_events_total", outcome="applied") == 3
    assert total(after, "nudge_profiles") >= 1
    assert total(after, "nudge_shard_up") == 4
    assert total(after, "nudge_shards_answered") == 4
    assert {ls for (n, ls) in after if n == "nudge_stream_lag_seconds"} == {
        (("shard", str(i)),) for i in range(4)
    }
    assert delta("nudge_checkpoint_seconds_count") >= 1
    assert total(after, "nudge_shard_memory_bytes") > 0
    # the send: decided, in the funnel, in the outbox, with its latency
    variant_fired = delta("nudge_funnel_total", rule="cart_abandonment", stage="fired")
    assert variant_fired == 1
    assert delta("nudge_trigger_latency_seconds_count") == 1
    assert total(after, "nudge_outbox_length") >= 1
    # content: two requests, per-block latency by source, a 404
    assert delta("nudge_content_requests_total", status="200") == 1
    assert delta("nudge_content_requests_total", status="404") == 1
    assert delta("nudge_content_seconds_count") == 2
    assert delta("nudge_content_block_seconds_count", block="cart", source="profile") == 1
    assert delta("nudge_content_block_seconds_count", block="profile", source="profile") == 1
    # and nothing on /metrics is missing from the catalog the dashboard is checked against
    known = known_series()
    exposed = {n for (n, _) in after if n.startswith("nudge_") and not n.endswith("_created")}
    assert exposed - set(known) == set()
    assert {"nudge_dlq_depth", "nudge_stream_length", "nudge_shards"} <= exposed


def test_console_login_and_its_json(engine, sync_redis) -> None:
    client, clock = engine
    page = client.get("/console")
    assert page.status_code == 200 and 'action="/console/login"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/console/api/live").status_code == 401
    refused = client.post("/console/login", data={"key": "dev-write-key"})
    assert refused.status_code == 401 and "not an admin key" in refused.text
    signed = client.post("/console/login", data={"key": "dev-admin-key"})
    assert signed.status_code == 303
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "uPlot.iife.min.js" in client.get("/console").text  # the cookie opens the page
    assert client.get("/console/static/uPlot.iife.min.js").status_code == 200

    added = {
        "userId": "bo",
        "event": "Product Added",
        "timestamp": at(0),
        "properties": {"product_id": "sku-2", "price": 5},
    }
    assert client.post("/v1/track", auth=WRITE, json=added).status_code == 200
    live = client.get("/console/api/live").json()
    assert live["totals"]["accepted"] >= 1 and live["gauges"]["shards"] == 4
    assert live["content_latency"]["le"][-1] is None  # +Inf last
    clock.advance(16 * 60)
    funnel = wait_until(lambda: client.get("/console/api/funnel?window=1d").json()["rules"])
    assert funnel[0]["rule"] == "cart_abandonment"
    person = client.get("/console/api/customer/bo").json()
    assert person["profile"]["cart"]["sku-2"]["price"] == 5
    assert [(s["rule"], s["state"]) for s in person["sends"]] == [("cart_abandonment", "queued")]
    # delivery takes it out of the outbox; dead-lettered, it shows with its send id ...
    [(entry_id, fields)] = sync_redis.xrange(outbox_key(shard_for("bo", 4)))
    send = orjson.loads(fields[b"s"])
    sync_redis.xdel(outbox_key(shard_for("bo", 4)), entry_id)
    dlq = f"nudge:{{s{shard_for('bo', 4)}}}:dlq"
    sync_redis.xadd(dlq, {"d": orjson.dumps({"send": send, "error": "550", "attempts": 6})})
    [shown] = client.get("/console/api/customer/bo").json()["sends"]
    assert shown["state"] == "dead-lettered" and shown["send_id"] == send["send_id"]
    # ... and once gone from both, the profile's send history still tells it was decided
    sync_redis.delete(dlq)
    [shown] = client.get("/console/api/customer/bo").json()["sends"]
    assert (shown["rule"], shown["state"]) == ("cart_abandonment", "decided")
    assert any(r["rule"] == "cart_abandonment" for r in person["explain"])
    assert client.get("/console/api/customer/nobody").status_code == 404
    # an admin Bearer key works without a cookie (for scripts)
    assert httpx.get(str(client.base_url) + "/console/api/live", headers=ADMIN).status_code == 200
    client.post("/console/logout")
    assert client.get("/console/api/live").status_code == 401


_WORKER = """
import sys
from engine.metrics import process
process.INGEST_EVENTS.labels("track", "accepted").inc(int(sys.argv[1]))
process.CONTENT_SECONDS.observe(0.01)
"""


_READER = """
import sys
from engine.metrics.collect import MetricsCollector, Scrape
c = MetricsCollector(shards=None, store=None, shard_count=0, multiproc_dir=sys.argv[1])
registry = c.registry(Scrape(0.0, {}))
print(registry.get_sample_value(
    "nudge_ingest_events_total", {"type": "track", "outcome": "accepted"}))
print(registry.get_sample_value("nudge_content_seconds_count"))
"""


def test_api_worker_processes_add_up_in_multiprocess_mode(tmp_path, redis_url: str) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in (3, 4):  # two worker processes count; a third reads
        subprocess.run([sys.executable, "-c", _WORKER, str(n)], env=env, check=True, cwd=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", _READER, str(tmp_path)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.split()
    assert out == ["7.0", "2.0"]


def test_nudge_serve_prepares_and_removes_the_multiprocess_dir(tmp_path, monkeypatch) -> None:
    from engine.metrics.multiproc import ENV, prepare_multiproc_dir, remove_multiproc_dir

    monkeypatch.delenv(ENV, raising=False)
    stale = tmp_path / "prometheus-multiproc"
    stale.mkdir()
    (stale / "counter_123.db").write_bytes(b"an earlier run's counts")
    path = prepare_multiproc_dir(str(tmp_path))
    assert path == str(stale) and os.environ[ENV] == path and os.listdir(path) == []
    remove_multiproc_dir(path)
    assert not stale.exists() and ENV not in os.environ
    monkeypatch.setenv(ENV, str(tmp_path / "theirs"))
    assert prepare_multiproc_dir(str(tmp_path)) is None  # the operator's own dir is left alone


def test_delivery_outcomes_from_the_ledger_are_sends_by_rule_variant_outcome(
    engine, sync_redis
) -> None:
    client, _ = engine
    # what the dispatchers' ledger writes (engine.delivery.ledger), on two shards
    sync_redis.hincrby("nudge:{s0}:dcounts", "cart_abandonment\x1furgency\x1fsent", 3)
    sync_redis.hincrby("nudge:{s2}:dcounts", "cart_abandonment\x1furgency\x1fsent", 2)
    sync_redis.hincrby("nudge:{s2}:dcounts", "vip_welcome\x1f\x1fsuppressed", 1)
    samples = scrape(client)
    assert total(samples, "nudge_sends_total", rule="cart_abandonment", outcome="sent") == 5
    assert total(samples, "nudge_sends_total", rule="vip_welcome", variant="-") == 1
    client.post("/console/login", data={"key": "dev-admin-key"})
    assert client.get("/console/api/live").json()["totals"]["sent"] == 5
    [rule] = [r for r in client.get("/console/api/funnel").json()["rules"]
              if r["rule"] == "cart_abandonment"]  # fmt: skip
    assert rule["variants"][0]["sent"] == 5

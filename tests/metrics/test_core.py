"""The pure parts of metrics: histograms, actor snapshots, the funnel, the z-test, sessions."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.console import data
from engine.console.session import Sessions
from engine.metrics import ActorMetrics, Buckets, families, merge, quantile, two_proportion_z
from engine.metrics.delivery import DeliveryMetrics
from engine.metrics.funnel import Funnel
from engine.metrics.hist import add_snapshots
from engine.metrics.shard import ShardMetrics


def send(sid: str, customer: str, at: float, *, rule="cart", variant="a", deliver=True) -> dict:
    return {
        "send_id": sid,
        "rule": rule,
        "variant": variant,
        "customer": customer,
        "at": at,
        "deliver": deliver,
    }


def track(customer: str, name: str, ts: float, **props) -> dict:
    return {"type": "track", "event": name, "customer": customer, "ts": ts, "properties": props}


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ([0, 10, 0], 0.5, 1.5),
        ([10, 0, 0], 1.0, 1.0),
        ([0, 0, 4], 0.99, 2.0),  # only +Inf: the highest finite bound
        ([5, 5, 0], 0.5, 1.0),
        ([0, 0, 0], 0.5, None),
    ],
)
def test_quantile_interpolates_inside_a_bucket(counts, q, expected) -> None:
    assert quantile((1.0, 2.0), counts, q) == expected


def test_buckets_count_at_their_upper_bound() -> None:
    h = Buckets((0.1, 1.0))
    for v in (0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.counts == [1, 2, 1] and h.count == 4 and h.sum == pytest.approx(8.6)
    with pytest.raises(ValueError):
        add_snapshots(h.snapshot(), Buckets((0.2,)).snapshot())


def test_actor_snapshots_add_up_and_render_as_prometheus_text() -> None:
    def actor(n: int) -> list[dict]:
        m = ActorMetrics()
        c = m.counter("nudge_x_total", "x", ("rule",))
        c.inc(("a",), n)
        c.inc(("b",))
        m.gauge("nudge_g", "g", ("shard",)).set((str(n),), n * 10)
        m.histogram("nudge_h_seconds", "h", (), (0.1, 1.0)).observe((), 0.05 * n)
        return m.snapshot()

    merged = merge([actor(1), actor(2), None])
    registry = CollectorRegistry()

    class Static:
        def collect(self):
            return families(merged)

    registry.register(Static())
    parsed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    assert parsed[("nudge_x_total", (("rule", "a"),))] == 3
    assert parsed[("nudge_x_total", (("rule", "b"),))] == 2
    assert parsed[("nudge_g", (("shard", "2"),))] == 20
    assert parsed[("nudge_h_seconds_bucket", (("le", "0.1"),))] == 2
    assert parsed[("nudge_h_seconds_count", ())] == 2
    assert parsed[("nudge_h_seconds_sum", ())] == pytest.approx(0.15)


def test_a_metric_cannot_be_defined_twice_differently() -> None:
    m = ActorMetrics()
    assert m.counter("nudge_a_total", "a", ("x",)) is m.counter("nudge_a_total", "a", ("x",))
    with pytest.raises(ValueError):
        m.counter("nudge_a_total", "a", ("y",))


def stages(funnel: Funnel) -> dict:
    return dict(funnel.stages.values)


def test_funnel_counts_unique_engagement_per_send_and_conversions_per_window() -> None:
    f = Funnel(ActorMetrics())
    f.on_send(send("s1", "ann", 1000.0))
    f.on_send(send("h1", "bob", 1000.0, variant="holdout", deliver=False))
    f.on_event(track("ann", "Email Opened", 1100.0, send_id="s1"))
    f.on_event(track("ann", "Email Opened", 1200.0, send_id="s1"))  # a second open: not new
    f.on_event(track("ann", "Email Link Clicked", 1300.0, send_id="s1"))
    f.on_event(track("ann", "Order Completed", 1000.0 + 2 * 3600))
    f.on_event(track("ann", "Order Completed", 1000.0 + 3 * 3600))  # converted once per send
    f.on_event(track("bob", "Order Completed", 1000.0 + 5 * 86400))
    assert stages(f) == {
        ("cart", "a", "fired"): 1,
        ("cart", "a", "queued"): 1,
        ("cart", "a", "opened"): 1,
        ("cart", "a", "clicked"): 1,
        ("cart", "holdout", "fired"): 1,
    }
    assert dict(f.conversions.values) == {
        ("cart", "a", "1d"): 1,
        ("cart", "a", "3d"): 1,
        ("cart", "a", "7d"): 1,
        ("cart", "holdout", "7d"): 1,
    }


def test_funnel_edge_cases() -> None:
    f = Funnel(ActorMetrics(), max_sends=2, variants={"vip": frozenset({"-"})})
    f.on_send(send("s1", "ann", 1000.0))
    f.on_event(track("ann", "Order Completed", 900.0))  # before the email was due
    f.on_event(track("ann", "Email Link Clicked", 1100.0, send_id="s1"))  # click implies open
    f.on_event(track("zed", "Email Opened", 1100.0, rule="vip", variant=None))  # by properties
    f.on_event(track("zed", "Email Opened", 1100.0))  # nothing to attribute it to
    f.on_send(send("s2", "bob", 1000.0))
    f.on_send(send("s3", "cy", 1000.0))  # the oldest (s1) is forgotten
    f.on_event(track("ann", "Order Completed", 1200.0))
    counts = stages(f)
    assert counts[("cart", "a", "opened")] == 1 and counts[("cart", "a", "clicked")] == 1
    assert counts[("vip", "-", "opened")] == 1
    assert dict(f.conversions.values) == {}


def test_the_funnel_counts_only_configured_rules_and_variants_named_by_clients() -> None:
    # The public write key could send Email Opened with any rule and variant, and
    # each made-up pair became a counter series on every scrape (2,000 events: 2,000).
    from engine.metrics.shard import rule_variants
    from engine.rules import RuleSet

    ruleset = RuleSet.from_toml(
        '[[rule]]\nname = "vip"\non = "Signed Up"\nholdout = 10\n'
        'variants = ["a", "b"]\n'
        '[[rule.step]]\ntemplate = "t"\n'
    )
    f = Funnel(ActorMetrics(), variants=rule_variants(ruleset))
    for n in range(50):
        f.on_event(track("zed", "Email Opened", 1100.0, rule=f"made-up-{n}", variant="a"))
        f.on_event(track("zed", "Email Opened", 1100.0, rule="vip", variant=f"v{n}"))
    for variant in ("a", "b", "holdout"):
        f.on_event(track("zed", "Email Opened", 1100.0, rule="vip", variant=variant))
    assert set(stages(f)) == {("vip", v, "opened") for v in ("a", "b", "holdout")}


def test_shard_metrics_count_sends_and_their_latency_at_checkpoint() -> None:
    m = ShardMetrics(3)
    sends = [send("s1", "ann", 100.0), send("s2", "bob", 100.0, variant=None)]
    m.on_checkpoint(0.004, sends, 102.0)
    m.on_checkpoint(0.001, [], 103.0, reason="urgent")
    snap = {s["name"]: s for s in m.snapshot(stats={"applied": 7}, failed=1, gauges={})}
    assert snap["nudge_checkpoints_total"]["samples"] == {("3", "interval"): 1, ("3", "urgent"): 1}
    assert snap["nudge_triggers_total"]["samples"] == {("cart", "a"): 1, ("cart", "-"): 1}
    latency = snap["nudge_trigger_latency_seconds"]["samples"][()]
    assert sum(latency["counts"]) == 2 and latency["sum"] == pytest.approx(4.0)
    assert snap["nudge_checkpoint_seconds"]["samples"][("3",)]["sum"] == pytest.approx(0.005)
    assert snap["nudge_shard_events_total"]["samples"][("3", "applied")] == 7
    assert snap["nudge_shard_events_total"]["samples"][("3", "failed")] == 1
    cpu = {"apply": 1.5, "process": 2.0}
    snap = {s["name"]: s for s in m.snapshot(stats={}, failed=0, gauges={}, cpu=cpu)}
    assert snap["nudge_shard_cpu_seconds_total"]["samples"] == {
        ("3", "apply"): 1.5,
        ("3", "process"): 2.0,
    }


def test_delivery_metrics_count_latency_of_successes_and_esp_requests() -> None:
    d = DeliveryMetrics()
    d.sent(send("s1", "ann", 10.0), "sent", 12.5)
    d.sent(send("s2", "ann", 10.0), "dead_lettered", 99.0)
    d.esp_request("smtp", "ok")
    snap = {s["name"]: s for s in d.snapshot()}
    assert snap["nudge_send_latency_seconds"]["samples"][()]["sum"] == 2.5
    assert sum(snap["nudge_send_latency_seconds"]["samples"][()]["counts"]) == 1
    assert snap["nudge_esp_requests_total"]["samples"] == {("smtp", "ok"): 1}


def test_two_proportion_z_matches_the_textbook() -> None:
    # 200/1000 vs 250/1000: z = 0.05 / sqrt(0.225 * 0.775 * 0.002) = 2.6774
    t = two_proportion_z(200, 1000, 250, 1000)
    assert t.z == pytest.approx(2.6774, abs=1e-4)
    assert t.p_value == pytest.approx(math.erfc(2.6774 / math.sqrt(2)), abs=1e-5)
    assert t.lift == pytest.approx(0.25)
    assert two_proportion_z(0, 0, 1, 10) is None
    assert two_proportion_z(0, 10, 0, 10).p_value == 1.0


def test_console_funnel_puts_variants_side_by_side_against_the_holdout() -> None:
    f = Funnel(ActorMetrics())
    for i in range(400):
        variant = ("classic", "urgency", "holdout")[i % 3]
        f.on_send(send(f"s{i}", f"c{i}", 0.0, variant=variant, deliver=variant != "holdout"))
        converts = {"classic": i % 10 == 0, "urgency": i % 4 == 1, "holdout": i % 20 == 2}
        if converts[variant]:
            f.on_event(track(f"c{i}", "Order Completed", 3600.0))
    actors = merge([f.stages and [f.stages.snapshot(), f.conversions.snapshot()]])
    body = data.funnel(actors, "1h")
    [rule] = body["rules"]
    assert rule["control"] == "holdout"
    rows = {r["variant"]: r for r in rule["variants"]}
    assert [r["variant"] for r in rule["variants"]] == ["classic", "urgency", "holdout"]
    assert rows["holdout"]["queued"] == 0 and "p_value" not in rows["holdout"]
    assert rows["urgency"]["converted"] > rows["classic"]["converted"] > 0
    assert rows["urgency"]["significant"] is True
    assert rows["urgency"]["vs"] == "holdout"
    expected = two_proportion_z(
        rows["holdout"]["converted"], rows["holdout"]["fired"],
        rows["urgency"]["converted"], rows["urgency"]["fired"],
    )  # fmt: skip
    assert rows["urgency"]["p_value"] == pytest.approx(expected.p_value)
    assert data.funnel(actors, "2w")["window"] == "3d"  # unknown windows fall back


def test_console_sessions_expire_and_are_bound_to_the_admin_keys() -> None:
    s = Sessions(("k1",), ttl_s=60)
    cookie = s.issue(1000.0)
    assert s.valid(cookie, 1059.0)
    assert not s.valid(cookie, 1061.0)
    assert not Sessions(("k2",), ttl_s=60).valid(cookie, 1001.0)
    expires, _, mac = cookie.partition(".")
    assert not s.valid(f"{int(expires) + 999}.{mac}", 1001.0)
    assert not s.valid("garbage", 1001.0) and not s.valid(None, 0.0)


def test_a_shard_late_for_one_scrape_leaves_the_others_series_as_they_were() -> None:
    # Series summed over shards dipped by a late shard's share (2,000 to 1,000 and
    # back), which Prometheus reads as a counter reset: increase() counted 2,000
    # sends that never happened. Each shard's series now carries its shard label.
    import asyncio

    from engine.metrics.collect import MetricsCollector

    meters = [ShardMetrics(0), ShardMetrics(1)]
    for m in meters:
        m.on_checkpoint(0.001, [send(f"s{m.index}-{i}", f"c{i}", 1.0) for i in range(1000)], 2.0)
    late = {"on": False}

    class Shards:
        shards = 2

        async def call(self, index: int, method: str) -> list[dict]:
            if index == 1 and late["on"]:
                await asyncio.sleep(5)
            return meters[index].snapshot(stats={"applied": 1}, failed=0, gauges={})

    class NoRedis:
        async def tails(self) -> dict:
            raise ConnectionError("not needed here")

    collector = MetricsCollector(
        shards=lambda: Shards(), store=lambda: NoRedis(), shard_count=2, timeout_s=0.2
    )

    async def triggers() -> dict[str, float]:
        text = (await collector.text()).decode()
        return {
            s.labels["shard"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "nudge_triggers_total"
        }

    async def three_scrapes() -> list[dict[str, float]]:
        out = []
        for slow in (False, True, False):
            late["on"] = slow
            out.append(await triggers())
        return out

    before, during, after = asyncio.run(three_scrapes())
    assert before == after == {"0": 1000.0, "1": 1000.0}
    assert during == {"0": 1000.0}  # the late one is missing, not lower

    # another source's actors carry the label it names, not the dispatchers'
    mailer = DeliveryMetrics()
    mailer.esp_request("hook", "ok")

    async def mailers() -> list:
        return [None, mailer.snapshot()]

    collector.add_actor_source(mailers, label="mailer")
    text = asyncio.run(collector.text()).decode()
    assert 'nudge_esp_requests_total{esp="hook",mailer="1",outcome="ok"} 1.0' in text
    with pytest.raises(ValueError):
        collector.add_actor_source(mailers, label="shard")


def test_two_sources_of_one_metric_keep_their_series_apart() -> None:
    # merge kept the first source's label list: a mailer's five requests were read
    # as dispatcher 0's (6 where it had 1), and a late mailer looked like a reset.
    from engine.metrics.actor import by_actor

    dispatcher, mailer = DeliveryMetrics(), DeliveryMetrics()
    dispatcher.esp_request("hook", "ok")
    for _ in range(5):
        mailer.esp_request("hook", "ok")
    merged = merge(
        [
            by_actor(dispatcher.snapshot(), "dispatcher", "0"),
            by_actor(mailer.snapshot(), "mailer", "0"),
        ]
    )
    registry = CollectorRegistry()
    registry.register(type("C", (), {"collect": lambda self: families(merged)})())
    samples = {
        (s.labels.get("dispatcher"), s.labels.get("mailer")): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
        if s.name == "nudge_esp_requests_total"
    }
    assert samples == {("0", ""): 1.0, ("", "0"): 5.0}

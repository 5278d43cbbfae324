"""`nudge bench`: the shopper model, the scaled rules, and the CI smoke run (promises asserted,
figures not)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.bench import scaled_rules
from benchmarks.shoppers import ShopperModel, retail_sessions, seasonality
from engine.rules import RuleSet
from tests.conftest import ROOT


def test_rule_waits_are_scaled_and_still_compile() -> None:
    text = (ROOT / "config.toml").read_text()
    scaled = scaled_rules(text, 180)
    assert 'wait = "15m"' in text and 'wait = "5s"' in scaled and 'wait = "15m"' not in scaled
    assert 'wait = "480s"' in scaled  # 24 h / 180
    RuleSet.from_sources([(scaled, "scaled")])


def test_the_shopper_model_funnels_and_power_laws() -> None:
    model = ShopperModel(seed=3, shoppers=5000)
    sessions = [model.session() for _ in range(5000)]
    kinds = Counter(s.kind for s in sessions)
    assert kinds["browse"] > kinds["cart"] > kinds["purchase"] > 0
    visits = Counter(s.customer for s in sessions)
    top = sum(n for _, n in visits.most_common(50))
    assert top > 5000 * 50 / 5000 * 3  # the 1% most active shoppers make >3x their share
    products = Counter(
        m["properties"]["product_id"]
        for s in sessions
        for m in s.messages
        if m.get("event") == "Product Viewed"
    )
    assert products.most_common(1)[0][1] > 20 * (sum(products.values()) / 2000)
    for s in sessions:  # an order holds what the visit added
        order = [m for m in s.messages if m.get("event") == "Order Completed"]
        if order:
            added = {
                m["properties"]["product_id"]
                for m in s.messages
                if m.get("event") == "Product Added"
            }
            assert {p["product_id"] for p in order[0]["properties"]["products"]} == added
    engaged = model.engagement({"send_id": "s", "rule": "r", "variant": "a", "customer": "c"})
    assert all(m["userId"] == "c" for v in engaged for m in v.messages)
    assert model.engagement({"send_id": "s", "rule": "r", "customer": "c", "deliver": False}) == []
    assert seasonality(19) == 1.0 and seasonality(3.5) < 0.2


def test_the_retail_replay_is_the_real_invoices() -> None:
    sessions = retail_sessions()
    assert len(sessions) > 10_000
    first = sessions[0]
    assert first.messages[-1]["event"] == "Order Completed"
    assert first.messages[-1]["properties"]["revenue"] == pytest.approx(
        sum(m["properties"]["price"] * m["properties"]["quantity"] for m in first.messages[:-1])
    )


@pytest.mark.slow
def test_nudge_bench_smoke(tmp_path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    run = subprocess.run(
        [sys.executable, "-m", "engine", "bench", "--duration", "20", "--rate", "2000",
         "--baseline-seconds", "1", "--check-fraction", "1", "--json", str(out), "--png", str(png)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    result = json.loads(out.read_text())
    broken = {k: p for k, p in result["promises"].items() if not p["ok"]}
    assert not broken, broken
    assert result["events_accepted"] > 0 and result["sends"] > 0 and result["content_calls"] > 0
    assert result["reference"]["expected_sends"] > 0
    # timers keep firing after the load stops, so /metrics (read last) may count a few more
    assert result["metrics"]["nudge_triggers_total"] >= result["sends"]
    assert "promises:" in run.stdout and "baseline: redis-py XADD" in run.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_delivery_benchmark_windows_find_the_slow_stretch() -> None:
    from benchmarks.delivery import by_window

    arrived = [100.0 + n * 0.1 for n in range(150)]  # 15 s of sends
    latencies = [0.5 if 62 <= n < 64 else 0.01 for n in range(150)]  # a pause at 6.2 s
    windows = by_window(arrived, latencies)
    assert windows["p99_ms"] == [10.0, 500.0, 10.0]
    assert windows["worst_second"] == {"at_s": 6, "max_ms": 500.0}
    assert by_window([], [])["worst_second"] is None
    assert by_window([0.0, 11.0], [0.01, 0.02])["p99_ms"] == [10.0, None, 20.0]  # a silent window

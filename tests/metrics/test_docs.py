"""The dashboard, the alert rules and docs/metrics.md name only series that exist."""

from __future__ import annotations

import json
import re

import yaml

from engine.metrics.collect import known_series
from tests.conftest import ROOT

_NAME = re.compile(r"\bnudge_[a-z0-9_]+")


def _names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def test_every_dashboard_query_uses_existing_series() -> None:
    known = known_series()
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 25
    used = set().union(*map(_names, exprs))
    assert used - set(known) == set()
    # every part of the issue has a panel
    for needed in (
        "nudge_ingest_events_total", "nudge_ingest_rejects_total", "nudge_stream_lag_seconds",
        "nudge_checkpoint_seconds_bucket", "nudge_checkpoint_age_seconds",
        "nudge_trigger_latency_seconds_bucket", "nudge_sends_total",
        "nudge_content_block_seconds_bucket", "nudge_content_cache_total",
        "nudge_content_fallbacks_total", "nudge_dlq_depth", "nudge_profiles",
        "nudge_shard_memory_bytes", "nudge_email_opens_total", "nudge_email_clicks_total",
        "nudge_send_latency_seconds_bucket",
    ):  # fmt: skip
        assert needed in used, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_alert_uses_existing_series() -> None:
    known = known_series()
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {
        "NudgeStreamLagGrowing", "NudgeDeadLetters", "NudgeContentP99NearDeadline",
        "NudgeCheckpointStale",
    } <= set(alerts)  # fmt: skip
    for name, rule in alerts.items():
        assert rule["for"] and rule["annotations"]["summary"], name
        used = _names(rule["expr"])
        assert used and used - set(known) == set(), (name, used - set(known))


def test_every_series_is_documented() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    documented = _names(text)
    bases = {re.sub(r"_(bucket|count|sum)$", "", n) for n in known_series()}
    assert bases - documented == set()
    assert documented - bases - {"nudge_"} == set()  # nothing documented that does not exist

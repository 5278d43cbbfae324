"""The console's JSON: live figures, per-rule funnels with significance (pure)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from engine.metrics.funnel import NO_VARIANT, WINDOWS
from engine.metrics.stats import two_proportion_z

HOLDOUT = "holdout"
SIGNIFICANT_P = 0.05


def index_samples(metrics: Iterable[Any]) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus metric families (from a registry's collect()) as {sample name: [(labels, v)]}."""
    out: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for metric in metrics:
        for sample in metric.samples:
            out[sample.name].append((sample.labels, sample.value))
    return out


def _sum(samples: dict, name: str, **match: str) -> float:
    return sum(
        v
        for labels, v in samples.get(name, ())
        if all(labels.get(k) == w for k, w in match.items())
    )


def _by(samples: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in samples.get(name, ()):
        out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + v
    return out


def _buckets(samples: dict, name: str) -> dict[str, list]:
    """Cumulative bucket counts of an unlabelled (or summed) histogram, by upper bound."""
    per_le: dict[float, float] = defaultdict(float)
    for labels, v in samples.get(name + "_bucket", ()):
        per_le[float(labels["le"])] += v
    bounds = sorted(per_le)
    return {
        "le": [b if b != float("inf") else None for b in bounds],
        "cum": [per_le[b] for b in bounds],
    }


def live(samples: dict, *, at: float, shards: int) -> dict[str, Any]:
    """Totals and gauges the console charts turn into rates (it diffs successive polls)."""
    dispatching = "nudge_sends_total" in samples
    lag = _by(samples, "nudge_stream_lag_seconds", "shard")
    age = _by(samples, "nudge_checkpoint_age_seconds", "shard")
    return {
        "at": at,
        "totals": {
            "accepted": _sum(samples, "nudge_ingest_events_total", outcome="accepted"),
            "rejected": _sum(samples, "nudge_ingest_events_total", outcome="rejected"),
            "applied": _sum(samples, "nudge_shard_events_total", outcome="applied"),
            "duplicates": _sum(samples, "nudge_shard_events_total", outcome="duplicate"),
            "triggers": _sum(samples, "nudge_triggers_total"),
            "queued": _sum(samples, "nudge_funnel_total", stage="queued"),
            "sent": _sum(samples, "nudge_sends_total", outcome="sent") if dispatching else None,
            "content": _sum(samples, "nudge_content_requests_total"),
            "fallbacks": _sum(samples, "nudge_content_fallbacks_total"),
        },
        "gauges": {
            "shards": shards,
            "shards_answered": _sum(samples, "nudge_shards_answered"),
            "profiles": _sum(samples, "nudge_profiles"),
            "timers": _sum(samples, "nudge_timers"),
            "memory_bytes": _sum(samples, "nudge_shard_memory_bytes"),
            "stream_lag_s": max(lag.values(), default=0.0),
            "checkpoint_age_s": max(age.values(), default=0.0),
            "outbox": _sum(samples, "nudge_outbox_length"),
            "dlq": _sum(samples, "nudge_dlq_depth") if "nudge_dlq_depth" in samples else None,
        },
        "content_latency": _buckets(samples, "nudge_content_seconds"),
    }


def funnel(actors: dict[str, dict], window: str = "3d") -> dict[str, Any]:
    """Per rule, its variants side by side; each variant's conversion rate tested against
    the holdout (or, without one, the first variant) with a two-proportion z-test."""
    if window not in dict(WINDOWS):
        window = "3d"
    rows: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (rule, variant, stage), v in (
        actors.get("nudge_funnel_total", {}).get("samples", {}).items()
    ):
        rows[rule][variant][stage] = v
    conversions = actors.get("nudge_funnel_conversions_total", {}).get("samples", {})
    for (rule, variant, within), v in conversions.items():
        if within == window:
            rows[rule][variant]["converted"] = v
    sends = actors.get("nudge_sends_total", {}).get("samples", {})
    for (rule, variant, outcome), v in sends.items():
        if outcome == "sent":
            rows[rule][variant]["sent"] = rows[rule][variant].get("sent", 0.0) + v
    out = []
    for rule in sorted(rows):
        variants = rows[rule]
        names = sorted(variants, key=lambda n: (n == HOLDOUT, n))
        control = HOLDOUT if HOLDOUT in variants else (names[0] if len(names) > 1 else None)
        base = variants.get(control, {}) if control else {}
        listed = []
        for name in names:
            st = variants[name]
            fired = int(st.get("fired", 0))
            row = {
                "variant": name if name != NO_VARIANT else None,
                "fired": fired,
                "queued": int(st.get("queued", 0)),
                "sent": int(st["sent"]) if "sent" in st else None,
                "opened": int(st.get("opened", 0)),
                "clicked": int(st.get("clicked", 0)),
                "converted": int(st.get("converted", 0)),
            }
            delivered = row["sent"] if row["sent"] is not None else row["queued"]
            row["open_rate"] = row["opened"] / delivered if delivered else None
            row["click_rate"] = row["clicked"] / delivered if delivered else None
            row["conversion_rate"] = row["converted"] / fired if fired else None
            if control and name != control:
                test = two_proportion_z(
                    int(base.get("converted", 0)), int(base.get("fired", 0)),
                    row["converted"], fired,
                )  # fmt: skip
                if test is not None:
                    row.update(
                        vs=control,
                        z=round(test.z, 3),
                        p_value=test.p_value,
                        lift=test.lift,
                        significant=test.p_value < SIGNIFICANT_P,
                    )
            listed.append(row)
        out.append({"rule": rule, "control": control, "variants": listed})
    return {"window": window, "windows": [w for w, _ in WINDOWS], "rules": out}

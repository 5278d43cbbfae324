"""Metrics of the delivery side (dispatcher actors), by the names the dashboard uses.

A dispatcher holds one `DeliveryMetrics`, counts into it, and reports it from a
Ray method the API collects at scrape time:

    self.meters = DeliveryMetrics()
    self.meters.sent(send, "sent", now)          # or "failed", "retried", "dead_lettered"
    async def metrics(self): return self.meters.snapshot()

and the API registers the dispatchers once: `collector.add_actor_source(fn)` (see
engine.metrics.collect). DLQ depth is not counted here but measured from Redis at
scrape time (`collector.add_stream_depth`).
"""

from __future__ import annotations

from engine.metrics.actor import ActorMetrics

SENT, FAILED, RETRIED, DEAD_LETTERED, SKIPPED = (
    "sent",
    "failed",
    "retried",
    "dead_lettered",
    "skipped",
)


class DeliveryMetrics:
    """nudge_sends_total, nudge_send_latency_seconds and nudge_esp_requests_total."""

    def __init__(self) -> None:
        self.registry = ActorMetrics()
        self.sends = self.registry.counter(
            "nudge_sends_total",
            "Sends handed to an ESP, by rule, variant and outcome "
            "(sent, failed, retried, dead_lettered, skipped)",
            ("rule", "variant", "outcome"),
        )
        self.latency = self.registry.histogram(
            "nudge_send_latency_seconds",
            "From when a send became due (its event's timestamp or its timer) to the ESP's accept",
        )
        self.esp = self.registry.counter(
            "nudge_esp_requests_total",
            "Requests to ESP adapters by ESP and outcome (ok, error, timeout)",
            ("esp", "outcome"),
        )

    def sent(self, send: dict, outcome: str, now: float) -> None:
        """Count one send's outcome; a successful one also its event-to-ESP latency."""
        self.sends.inc((send["rule"], send.get("variant") or "-", outcome))
        if outcome == SENT:
            self.latency.observe((), max(now - float(send["at"]), 0.0))

    def esp_request(self, esp: str, outcome: str) -> None:
        """Count one ESP request."""
        self.esp.inc((esp, outcome))

    def snapshot(self) -> list[dict]:
        """Plain data for `ActorMetrics.merge`."""
        return self.registry.snapshot()

"""What a shard counts: the metrics it reports through `ShardActor.metrics()` (pure).

Nothing here runs per event except the funnel's check for engagement and order
events; checkpoints are counted once per checkpoint, sends once per outbox write.
"""

from __future__ import annotations

from typing import Any

from engine.metrics.actor import ActorMetrics
from engine.metrics.funnel import NO_VARIANT, WATCHED, Funnel


def rule_variants(rules: Any) -> dict[str, frozenset[str]]:
    """Each rule of a RuleSet (or None) with the variant names its sends can carry."""
    from engine.rules.gates import HOLDOUT

    out = {}
    for rule in rules.rules if rules is not None else ():
        names = {NO_VARIANT, HOLDOUT, *(name for name, _ in rule.variants)}
        out[rule.name] = frozenset(names)
    return out


CHECKPOINT_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ShardMetrics:
    """Counters, histograms and the funnel of shard `index`."""

    watched = WATCHED

    def __init__(self, index: int, rules: Any = None):
        self.index = index
        self.shard = (str(index),)
        self.registry = ActorMetrics()
        m = self.registry
        self.funnel = Funnel(m, variants=rule_variants(rules))
        self.triggers = m.counter(
            "nudge_triggers_total",
            "Sends decided by trigger rules and written to the outbox (holdout records too)",
            ("rule", "variant"),
        )
        self.trigger_latency = m.histogram(
            "nudge_trigger_latency_seconds",
            "From when a send became due (its event's receipt, or its timer) to its outbox write",
        )
        self.checkpoint_seconds = m.histogram(
            "nudge_checkpoint_seconds",
            "Duration of one checkpoint write (MULTI/EXEC)",
            ("shard",),
            CHECKPOINT_BOUNDS,
        )
        self.checkpoints = m.counter(
            "nudge_checkpoints_total",
            "Checkpoints written, by what brought them on: interval, events (checkpoint_events),"
            " urgent (merges for other shards or erasures waiting), stop, asked (checkpoint_now)",
            ("shard", "reason"),
        )
        self.events = m.counter(
            "nudge_shard_events_total",
            "Events a shard took from its stream, by outcome",
            ("shard", "outcome"),
        )
        self.cpu = m.counter(
            "nudge_shard_cpu_seconds_total",
            "CPU seconds of the shard's process (activity=process) and, within it, of its loop"
            " thread's apply, decode, timers, checkpoint_encode and heap work",
            ("shard", "activity"),
        )
        self.gauges = {
            name: m.gauge(name, help, ("shard",))
            for name, help in (
                ("nudge_shard_up", "1 when the shard has recovered and is applying its stream"),
                ("nudge_profiles", "Profiles in memory"),
                ("nudge_aliases", "Merged ids (aliases) in memory"),
                ("nudge_timers", "Customers with a pending rule timer"),
                ("nudge_shard_memory_bytes", "Resident memory of the shard's process"),
                ("nudge_checkpoint_age_seconds", "Seconds since the last checkpoint"),
                ("nudge_checkpoint_lag_events", "Events applied but not yet checkpointed"),
                ("nudge_stream_position_ms", "Millisecond part of the last applied stream id"),
            )
        }

    def on_checkpoint(
        self, seconds: float, sends: list[dict], now: float, *, reason: str = "interval"
    ) -> None:
        """A checkpoint (brought on by `reason`) wrote `sends` to the outbox in `seconds`,
        at wall time `now`."""
        self.checkpoint_seconds.observe(self.shard, seconds)
        self.checkpoints.inc((*self.shard, reason))
        if sends:
            self.on_sends(sends, now)

    def on_sends(self, sends: list[dict], now: float) -> None:
        """`sends` reached the outbox at wall time `now`."""
        inc = self.triggers.inc
        observe = self.trigger_latency.observe
        on_send = self.funnel.on_send
        for send in sends:
            inc((send["rule"], send.get("variant") or "-"))
            observe((), max(now - float(send["at"]), 0.0))
            on_send(send)

    def snapshot(
        self,
        *,
        stats: dict,
        failed: int,
        gauges: dict[str, float],
        cpu: dict[str, float] | None = None,
    ) -> list[dict]:
        """The registry as plain data, with the shard's current counters and gauges."""
        for activity, seconds in (cpu or {}).items():
            self.cpu.set((*self.shard, activity), seconds)
        for outcome, count in stats.items():
            self.events.set((*self.shard, outcome), count)
        self.events.set((*self.shard, "failed"), failed)
        for name, value in gauges.items():
            self.gauges[name].set(self.shard, value)
        return self.registry.snapshot()

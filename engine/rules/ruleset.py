"""The decision core: events and due timers in, sends out, state in `profile.journey`.

Time is an argument. An event's own time (`ts`) anchors everything it starts,
and a timer fires "at" its deadline: conditions see the profile as of that
logical time (window functions ignore later events), which keeps outcomes the
same however late the shell gets round to calling. `now` only decides
expiry, and when a late firing actually goes out (`Send.at`).

Per-customer state lives in `profile.journey` (see engine.rules.state for its
shape), so it is checkpointed with the profile and survives restarts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from engine.rules import plan, state
from engine.rules.compile import Ctx
from engine.rules.gates import HOLDOUT, Zones, assign, cap_free_at, next_allowed
from engine.rules.load import load
from engine.rules.model import DEFER, ENTER, EVENT, INACTIVE, LEAVE, SKIP, Rule, Segment, Settings
from engine.rules.send import Send, send_id

_MAX_FIRINGS = 500  # per call: a guard, far above what any sane flow needs
_MAX_DEFERS = 100  # per step: quiet hours and caps always converge well before this
_LATE_HORIZON = state.LATE_HORIZON
RECHECK = "~segments"  # the idle-timer name of the periodic segment re-check
# Functions whose answer depends on nothing but the profile's fields (not on the time).
_TIMELESS_CALLS = frozenset(
    {"len", "lower", "abs", "round", "min", "max", "coalesce", "product_ids", "segment"}
    | {"cart_total", "score"}
)
_remember_last, _note_activity = state.remember_last, state.note_activity
_EMPTY: dict = {}


class RuleSet:
    """Compiled rules and segments, indexed by the event names that can move them."""

    def __init__(self, settings: Settings, segments: list[Segment], rules: list[Rule]):
        self.settings = settings
        self.segments = tuple(segments)
        self.rules = tuple(sorted(rules, key=lambda r: (-r.priority, r.order)))
        self.by_name = {rule.name: rule for rule in self.rules}
        self.zones = Zones(settings.timezone)
        self._priority = {rule.name: rule.priority for rule in self.rules}
        self._segment_rules = [r for r in self.rules if r.kind in (ENTER, LEAVE)]
        # Which segments a customer's membership was last baselined against (see _update_segments).
        self._segment_names = ",".join(s.name for s in self.segments)
        # Segments whose answer can change with time alone (windows, days_since, RFM recency):
        # re-checked every `recheck_s` without events. The shard sets recheck_s from config.
        self.timed_segments = any(_timed(s) for s in self.segments)
        self.recheck_s = 0.0
        self._build_index()
        windows = [c.per for c in settings.caps] + [c.per for r in self.rules for c in r.caps]
        self._history_keep = max([86400.0, settings.suppression, *windows])

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_toml(cls, text: str, *, source: str = "config.toml") -> RuleSet:
        """Rules from one TOML document (other top-level sections are ignored)."""
        return cls.from_sources([(text, source)])

    @classmethod
    def from_sources(cls, sources: Iterable[tuple[str, str]]) -> RuleSet:
        """Rules from several (text, source) documents, e.g. config.toml and a rules dir."""
        settings, segments, rules = load(sources)
        return cls(settings, segments, rules)

    def _build_index(self) -> None:
        tracked: dict[str, set[str] | None] = {}

        def track(name: str, props: set[str] | None) -> None:
            if name in tracked and tracked[name] is None:
                return
            tracked[name] = None if props is None else (tracked.get(name) or set()) | props

        for rule in self.rules:
            if rule.kind == EVENT:
                # explain replays the entry condition on the last such event: keep what it reads
                props: set[str] | None = set()
                for expr in (rule.cond, rule.key):
                    if expr is not None:
                        if expr.refs.event_whole:
                            props = None
                        elif props is not None:
                            props |= expr.refs.event_props
                for name in rule.on:
                    track(name, props)
            for _, expr in rule.expressions():
                for name, wanted in expr.refs.last.items():
                    track(name, wanted)
        for segment in self.segments:
            for name, wanted in segment.cond.refs.last.items():
                track(name, wanted)
        frozen = {k: (None if v is None else frozenset(v)) for k, v in tracked.items()}
        self._plans, self._default_plan = plan.build(self.rules, self.segments, frozen)

    # -- the three calls the shard makes ------------------------------------------------
    def on_event(self, profile: Any, event: dict, now: float) -> list[Send]:
        """Sends caused by `event`, already folded into `profile` by apply_event.

        Timers of this customer that fell due before the event's time fire
        first, so the outcome does not depend on how often `on_due` is polled.
        """
        journey = profile.journey
        t = event["ts"]
        if profile.suppressed:
            state.silence(journey, self, t)
            return []
        sends: list[Send] = []
        if journey:
            silenced = journey.get("silenced")
            if silenced is not None:
                if t <= silenced:
                    return []  # from before consent was withdrawn: it may not act after it
                if journey.pop("optout", None):
                    # This event gave consent back (nothing else ends an opt-out): one
                    # from while the customer was opted out, delivered late, may not
                    # act either, as it could not have in order. Events at this same
                    # instant may.
                    journey["silenced"] = t - 1e-6
            due = journey.get("due")
            if due is not None and due < t:
                self._run_due(profile, t, now, sends, strict=True)
        last_seen = profile.last_seen
        if last_seen is not None and t < last_seen - _LATE_HORIZON:
            return []  # too late to tell from a replay, and too stale to start a journey
        name = event.get("event") or event.get("type") or ""
        todo = self._plans.get(name) or self._default_plan
        props = event.get("properties") or _EMPTY
        if todo.track:
            _remember_last(journey, name, t, props, todo.keep)
        entered = left = ()
        if todo.segments or (self.segments and journey.get("sk") != self._segment_names):
            entered, left = self._update_segments(profile, t, new=_is_new(profile, t))
        changed = False
        running = journey.get("i")
        if running or todo.entries or todo.dispatch or entered or left:
            ctx = Ctx(self, profile, t, props, name)
        if running:  # cancels and restarts only touch running instances
            for rule, cancel in todo.cancels:
                if rule.name in running:
                    changed |= self._cancel(profile, rule, cancel, ctx, t)
            for rule in todo.restarts:
                if rule.name in running:
                    changed |= self._restart(profile, rule, ctx, t)
        for rule, cond in todo.entries:
            if cond is None or cond(ctx):
                changed |= self._enter(profile, rule, ctx, t, props)
        for prop, table in todo.dispatch:
            value = props.get(prop)
            if value.__class__ is str:
                candidates = table.get(value, ())
            elif value.__class__ is int:
                candidates = table.get(str(value), ())
            elif value is None:
                continue  # == "x" or in [...] never holds for a missing property
            else:
                # A float or other value the table is not keyed by: its full
                # conditions decide (9.5 in ["9.5", "10"] holds, as explain says).
                candidates = dict.fromkeys(e for entries in table.values() for e in entries)
            for rule, cond in candidates:
                if cond is None or cond(ctx):
                    changed |= self._enter(profile, rule, ctx, t, props)
        if entered or left:
            for rule in self._segment_rules:
                if rule.segment in (entered if rule.kind == ENTER else left) and (
                    rule.cond is None or rule.cond.fn(ctx)
                ):
                    changed |= self._enter(profile, rule, ctx, t, props)
        activity = todo.activity
        if activity and _note_activity(journey, t, activity):
            changed = True
        if changed:
            state.refresh_due(journey)
            due = journey.get("due")
            if due is not None and due <= t:
                self._run_due(profile, t, now, sends, strict=False)
        return sends

    def on_due(self, profile: Any, now: float) -> list[Send]:
        """Fire this customer's timers due at or before `now`, each at its own deadline."""
        journey = profile.journey
        if profile.suppressed:
            state.silence(journey, self, now)
            return []
        due = journey.get("due")
        if due is None or due > now:
            return []
        sends: list[Send] = []
        self._run_due(profile, now, now, sends, strict=False)
        return sends

    def on_change(self, profile: Any, now: float) -> list[Send]:
        """Re-evaluate segments after the profile changed outside an event (model scores).

        Entering or leaving fires the enter_segment / leave_segment rules at `now`.
        """
        if not self.segments or profile.suppressed:
            return []
        journey = profile.journey
        entered, left = self._update_segments(profile, now, new=False)
        if not (entered or left):
            return []
        sends: list[Send] = []
        if self._segments_moved(profile, now, entered, left):
            state.refresh_due(journey)
            due = journey.get("due")
            if due is not None and due <= now:
                self._run_due(profile, now, now, sends, strict=False)
        return sends

    def _segments_moved(
        self, profile: Any, t: float, entered: tuple[str, ...], left: tuple[str, ...]
    ) -> bool:
        """Start the enter/leave rules of segments entered or left at `t`."""
        ctx = Ctx(self, profile, t)
        changed = False
        for rule in self._segment_rules:
            if rule.segment in (entered if rule.kind == ENTER else left) and (
                rule.cond is None or rule.cond.fn(ctx)
            ):
                changed |= self._enter(profile, rule, ctx, t, _EMPTY)
        return changed

    def next_deadline(self, profile: Any) -> float | None:
        """When this customer next needs `on_due` (None: no pending timer)."""
        return profile.journey.get("due")

    def explain(self, profile: Any, now: float) -> list[dict]:
        """Per rule: what it did, what it waits for, or which condition failed and why."""
        from engine.rules.explain import explain

        return explain(self, profile, now)

    # -- helpers used by functions and explain --------------------------------------------
    def zone(self, profile: Any):
        """The customer's time zone (profile, then traits, then the default).

        A name that is no zone (context.timezone "GMT+05:30") is passed over.
        """
        for name in (profile.timezone, profile.traits.get("timezone")):
            zone = self.zones.find(name) if isinstance(name, str) else None
            if zone is not None:
                return zone
        return self.zones.default

    def local_time(self, profile: Any, at: float) -> datetime:
        """`at` on the customer's wall clock."""
        return datetime.fromtimestamp(at, self.zone(profile))

    def priority_of(self, rule: str) -> int | None:
        """Priority of the rule called `rule` (None if it no longer exists)."""
        return self._priority.get(rule)

    # -- entering, cancelling, restarting ---------------------------------------------------
    def _enter(self, profile: Any, rule: Rule, ctx: Ctx, t: float, props: dict) -> bool:
        """Start an instance of `rule` (its condition already holds)."""
        key = state.key_of(rule, ctx)
        if key is None:
            return False
        running = profile.journey.get("i")
        if running is not None and key in running.get(rule.name, _EMPTY):
            return False  # as start() would answer, before copying the trigger's properties
        return state.start(
            profile.journey, rule, key, t, state.kept(props, rule.keep), owner=profile.id
        )

    def _cancel(self, profile: Any, rule: Rule, cancel: Any, ctx: Ctx, t: float) -> bool:
        journey = profile.journey
        running = journey.get("i", {}).get(rule.name)
        if not running:
            return False
        changed = False
        for key, inst in list(running.items()):
            if inst["s"] > t:
                continue  # an event cannot cancel what started after it (a late duplicate)
            if cancel.cond is not None:
                ctx.key, ctx.trig, ctx.started = key, inst["t"], inst["s"]
                hit = cancel.cond.fn(ctx)
                ctx.key, ctx.trig, ctx.started = None, {}, None
                if not hit:
                    continue
            state.end(journey, rule, key, t, "cancelled", ctx.name or "")
            changed = True
        return changed

    def _restart(self, profile: Any, rule: Rule, ctx: Ctx, t: float) -> bool:
        running = profile.journey.get("i", {}).get(rule.name)
        if not running:
            return False
        key = state.key_of(rule, ctx)
        inst = running.get(key) if key is not None else None
        if inst is None:
            return False
        later = t + rule.steps[inst["n"]].wait
        if later <= inst["d"]:
            return False  # restarts only push back (a late duplicate changes nothing)
        inst["d"] = later
        inst.pop("x", None)
        return True

    def _update_segments(
        self, profile: Any, t: float, *, new: bool
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Recompute membership; (entered, left).

        A segment this customer was never evaluated against (the customer
        predates it, or predates this version of Nudge) is a baseline: its
        membership is recorded without counting as entering, so adding a
        segment does not welcome every old customer at once. A brand-new
        customer has no baseline to keep: qualifying on the first event enters.
        """
        ctx = Ctx(self, profile, t)
        members = [s.name for s in self.segments if s.cond.fn(ctx)]
        journey = profile.journey
        before = journey.get("seg") or []
        known = journey.get("sk")
        if known != self._segment_names:
            journey["sk"] = self._segment_names
            if not new:
                if known is None and "seg" in journey:
                    known = ",".join(before)  # evaluated before baselines were recorded
                baseline = set((known or "").split(","))
                before = [s for s in before if s in baseline] + [
                    s for s in members if s not in baseline
                ]
        if self.recheck_s > 0 and self.timed_segments:
            _schedule_recheck(journey, t + self.recheck_s)
        if members == before:
            if members != (journey.get("seg") or []):  # a baseline recorded silently
                if members:
                    journey["seg"] = members
                else:
                    journey.pop("seg", None)
            return (), ()
        if members:
            journey["seg"] = members
        else:
            journey.pop("seg", None)
        entered = tuple(s for s in members if s not in before)
        left = tuple(s for s in before if s not in members)
        return entered, left

    def _recheck(self, profile: Any, due: float) -> bool:
        """The periodic re-check: segments as of `due`; True if a rule was started."""
        entered, left = self._update_segments(profile, due, new=False)  # also schedules the next
        if entered or left:
            return self._segments_moved(profile, due, entered, left)
        return False

    # -- timers ------------------------------------------------------------------------------
    def _run_due(
        self, profile: Any, limit: float, now: float, sends: list[Send], *, strict: bool
    ) -> None:
        """Fire timers due before `limit` (or at it, unless strict), earliest first."""
        journey = profile.journey
        for _ in range(_MAX_FIRINGS):
            found = state.earliest(journey, self._priority)
            if found is None:
                journey.pop("due", None)
                return
            due, kind, name, key = found
            if due > limit or (strict and due == limit):
                journey["due"] = due  # the earliest deadline left (what refresh_due would find)
                return
            rule = self.by_name.get(name)
            if kind == "idle":
                del journey["idle"][name]
                if not journey["idle"]:
                    del journey["idle"]
                if name == RECHECK:
                    self._recheck(profile, due)
                elif rule is not None and rule.kind == INACTIVE:
                    self._wake(profile, rule, due)
            elif rule is None or journey["i"][name][key]["n"] >= len(rule.steps):
                state.drop(journey, name, key)  # the rule was removed or shortened
            else:
                self._fire(profile, rule, key, now, sends)
        state.refresh_due(journey)

    def _wake(self, profile: Any, rule: Rule, due: float) -> None:
        """An inactivity deadline passed: enter the rule as of that moment."""
        ctx = Ctx(self, profile, due)
        if rule.cond is not None and not rule.cond.fn(ctx):
            state.outcome(profile.journey, rule, due, "not entered", rule.cond.text)
            return
        key = state.key_of(rule, ctx)
        if key is not None:
            state.start(profile.journey, rule, key, due, {}, owner=profile.id)

    def _fire(self, profile: Any, rule: Rule, key: str, now: float, sends: list[Send]) -> None:
        """Run the due step of one instance: check every gate, then send, skip, defer or end."""
        journey = profile.journey
        inst = journey["i"][rule.name][key]
        due = inst["d"]
        step = rule.steps[inst["n"]]
        moment = due if due >= now else now
        if rule.expires is not None and now - due > rule.expires:
            state.end(journey, rule, key, moment, "expired", f"due {_iso(due)}")
            return
        ctx = Ctx(
            self, profile, due, event=inst["t"], key=key, trigger=inst["t"], started=inst["s"]
        )
        if rule.exit is not None and rule.exit.fn(ctx):
            state.end(journey, rule, key, moment, "exited", rule.exit.text)
            return
        if step.cond is not None and not step.cond.fn(ctx):
            state.advance(journey, rule, key, moment, "skipped", step.cond.text)
            return
        if rule.suppressible:
            by = self._suppressor(journey, rule, moment)
            if by is not None:
                state.end(journey, rule, key, moment, "suppressed", by)
                return
        if rule.quiet is not None:
            allowed = next_allowed(moment, self.zone(profile), rule.quiet)
            if allowed > moment:
                state.defer(journey, rule, key, allowed, "quiet hours", _MAX_DEFERS)
                return
        history = journey.get("h", ())
        free = None
        if rule.caps:
            free = cap_free_at(history, rule.caps, moment, rule.name)
        if self.settings.caps:
            other = cap_free_at(history, self.settings.caps, moment, None)
            if other is not None:
                free = other if free is None else max(free, other)
        if free is not None:
            if rule.on_cap == SKIP or math.isinf(free):
                state.advance(journey, rule, key, moment, "capped", "frequency cap")
                return
            assert rule.on_cap == DEFER
            state.defer(journey, rule, key, free, "frequency cap", _MAX_DEFERS)
            return
        # The customer the instance began with: a merge since (an anonymous visitor
        # who logged in) must not change its arm, nor the send ids a replay decides.
        owner = inst.get("c", profile.id)
        variant = (
            assign(rule.experiment, owner, rule.variants, rule.holdout)
            if (rule.variants or rule.holdout)
            else None
        )
        template = step.template.replace("{variant}", variant) if variant else step.template
        number = inst["n"] + 1
        sends.append(
            Send(
                send_id=send_id(rule.name, number, owner, inst["id"]),
                rule=rule.name,
                step=number,
                variant=variant,
                customer=profile.id,
                at=moment,
                template=template,
                esp=step.esp or rule.esp,
                payload=self._payload(rule, step, ctx),
                deliver=variant != HOLDOUT,
                instance=inst["id"],
            )
        )
        state.record_send(journey, rule.name, moment, self._history_keep)
        state.advance(
            journey, rule, key, moment, HOLDOUT if variant == HOLDOUT else "sent", template
        )

    def _suppressor(self, journey: dict, rule: Rule, at: float) -> str | None:
        """The higher-priority rule that silences `rule` at `at`, if any.

        Within the suppression window after a higher-priority send, or before
        a higher-priority instance's next step, lower-priority rules stay quiet.
        """
        window = self.settings.suppression
        if window <= 0:
            return None
        mine = rule.priority
        priority = self._priority
        for ts, name in journey.get("h", ()):
            if ts > at - window and priority.get(name, mine) > mine:
                return name
        for name, running in journey.get("i", {}).items():
            if priority.get(name, mine) > mine and any(
                i["d"] <= at + window for i in running.values()
            ):
                return name
        return None

    def _payload(self, rule: Rule, step: Any, ctx: Ctx) -> dict:
        out = {name: _plain(expr.fn(ctx)) for name, expr in rule.payload}
        for name, expr in step.payload:
            out[name] = _plain(expr.fn(ctx))
        blocks = step.blocks if step.blocks is not None else rule.blocks
        if blocks:
            out.setdefault("blocks", list(blocks))
        return out


def _timed(segment: Segment) -> bool:
    """True when the segment's condition can change with time alone."""
    refs = segment.cond.refs
    return bool(refs.calls - _TIMELESS_CALLS) or bool({"now", "rfm"} & refs.names)


def _is_new(profile: Any, t: float) -> bool:
    """True when the event at `t` is the customer's first (the profile was just created)."""
    return profile.first_seen == t and len(profile.seen) <= 1


def _schedule_recheck(journey: dict, at: float) -> None:
    idle = journey.get("idle")
    if idle is None:
        idle = journey["idle"] = {}
    if RECHECK in idle and idle[RECHECK] <= at:
        return
    idle[RECHECK] = at
    due = journey.get("due")
    if due is None or at < due:
        journey["due"] = at


def _plain(value: Any) -> Any:
    """A JSON-able deep copy (the payload must not alias live profile data)."""
    cls = value.__class__
    if cls is str or cls is int or cls is float or cls is bool or value is None:
        return value
    if cls is dict:
        return {k if k.__class__ is str else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return None


def _iso(ts: float) -> str:
    from datetime import UTC

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

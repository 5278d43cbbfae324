"""One shard's state: its customers' profiles, aliases and erasures (pure, no I/O).

The shard actor feeds events in stream order with `apply`, reads profiles with
`lookup`, and calls `take_changes` to learn what to checkpoint (or
`begin_changes` and then `encode_pending` in slices, applying events in between:
a profile still to be encoded is encoded just before it next changes, so each
is checkpointed exactly as it was when the checkpoint began). Messages for
customers owned by other shards come back as forwards; the actor writes them
to the owners' streams (at least once: every receiver here is idempotent).

Internal event types, written by the engine and never accepted from clients:
  _merge_out  at the old id's shard: give its profile to `userId`, leave an alias
  _merge_in   at the new id's shard: fold the carried profile in (once per merge)
  _erase      remove a customer for good; later events for the id are dropped
  _unalias    drop an alias to an erased customer

With a RuleSet, every applied event is also offered to the trigger rules and
`tick(now)` fires due timers; decided sends leave through `take_sends` as soon
as they are decided (and any left over with the checkpoint's changes), always
before the checkpoint that holds the state that decided them. Send ids are
deterministic, so a replay after a crash decides the same ids again and the
outbox keeps them out (engine.store.append_sends).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.profile import Limits, Profile, apply_event, merge_profiles, share_strings
from engine.rules import RuleSet, TimerIndex, merge_journey

APPLIED, DUPLICATE, DROPPED, FORWARDED = "applied", "duplicate", "dropped", "forwarded"
# Forwards along aliases, at most: a chain of renames (alias r0 to r1, r1 to r2, ...)
# is followed this far, and a loop of merges (see _merge_in) is broken within it.
MAX_ALIAS_HOPS = 16


def erased_key(customer_id: str) -> str:
    """The digest kept for an erased customer, so the id itself is not retained."""
    return hashlib.blake2b(customer_id.encode(), digest_size=16).hexdigest()


def merge_id(customer_id: str, other_id: str, message_id: str) -> str:
    """The id of the merge of `other_id` into `customer_id` that message `message_id` began.

    The same on a replay of that message, and short, as each merged profile keeps them.
    """
    key = f"{customer_id}\0{other_id}\0{message_id}".encode()
    return hashlib.blake2b(key, digest_size=9).hexdigest()


@dataclass
class Changes:
    """What changed since the last checkpoint, already encoded (safe to await after)."""

    profiles: dict[str, bytes] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    unaliased: list[str] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)
    forwards: list[tuple[str, dict]] = field(default_factory=list)
    sends: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.profiles
            or self.deleted
            or self.aliases
            or self.unaliased
            or self.erased
            or self.forwards
            or self.sends
        )


class Partition:
    """Profiles of the customers that hash to one shard."""

    def __init__(
        self,
        owns: Callable[[str], bool],
        *,
        limits: Limits | None = None,
        rules: RuleSet | None = None,
        insight: Any = None,
    ):
        self.owns = owns
        self.limits = limits or Limits()
        self.rules = rules
        # engine.insight.live.LiveInsight: recommendation counts, RFM, model scoring queue
        self.insight = insight
        self.timers = TimerIndex()
        self.sent = 0
        self.profiles: dict[str, Profile] = {}
        self.aliases: dict[str, str] = {}
        self.erased: set[str] = set()
        self.stats = {APPLIED: 0, DUPLICATE: 0, DROPPED: 0, FORWARDED: 0}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._dirty_aliases: set[str] = set()
        self._unaliased: set[str] = set()
        self._new_erased: list[str] = []
        self._forwards: list[tuple[str, dict]] = []
        self._sends: list[dict] = []
        # A checkpoint being taken: profiles still to encode, and where the encoded go.
        self._pending: dict[str, Profile] = {}
        self._encoded: dict[str, bytes] = {}

    # -- reading -------------------------------------------------------------
    def lookup(self, customer_id: str) -> Profile | str | None:
        """The profile, the id it was merged into (a str), or None if unknown."""
        profile = self.profiles.get(customer_id)
        if profile is not None:
            return profile
        return self.aliases.get(customer_id)

    # -- applying ------------------------------------------------------------
    def apply(self, event: dict) -> str:
        """Apply one normalized event; returns applied, duplicate, dropped or forwarded."""
        outcome = self._apply(event)
        self.stats[outcome] += 1
        return outcome

    def _apply(self, event: dict) -> str:
        kind = event["type"]
        customer = event["customer"]
        if kind[0] == "_":
            return self._internal(kind, customer, event)
        if self.erased and erased_key(customer) in self.erased:  # no digest while none erased
            return DROPPED
        if customer in self.aliases:
            # A merged id (anonymous, or an alias's previousId) now names another
            # profile; following it, never recreating one here, keeps one person one profile.
            target = self.aliases[customer]
            return self._forward(target, {**event, "userId": target, "customer": target})
        profile = self.profiles.get(customer)
        if profile is None:
            profile = self.profiles[customer] = Profile(customer, anonymous=event["userId"] is None)
            self._deleted.discard(customer)
        elif self._pending:
            self._before_change(customer)
        if profile.is_duplicate(event["messageId"], event["receivedAt"], self.limits):
            return DUPLICATE
        share_strings(event)
        insight = self.insight
        if insight is not None and insight.catalog:
            insight.enrich(event)
        apply_event(profile, event, self.limits)
        # From here the profile has changed, and the merge below must start, whatever
        # fails in between (the shard counts and logs the failure).
        self._dirty.add(customer)
        try:
            if insight is not None:
                insight.on_applied(profile, event)
            if self.rules is not None:
                # receivedAt, not the wall clock: a replay must decide exactly the same.
                self._decided(profile, self.rules.on_event(profile, event, event["receivedAt"]))
        finally:
            self._start_merge(kind, customer, profile, event)
        return APPLIED

    def _start_merge(self, kind: str, customer: str, profile: Profile, event: dict) -> None:
        other = event.get("previousId") if kind == "alias" else event["anonymousId"]
        if (
            other
            and other != customer
            and other not in profile.merged_ids
            and other not in profile.merging
        ):
            profile.merging.append(other)
            self._send(
                other,
                {
                    "type": "_merge_out",
                    "customer": other,
                    "userId": customer,
                    "merge": merge_id(customer, other, event["messageId"]),
                    "ts": event["ts"],
                },
            )

    def _internal(self, kind: str, customer: str, event: dict) -> str:
        if kind == "_merge_out":
            if erased_key(customer) in self.erased:
                return DROPPED  # an erased id is never linked to anyone again
            target = event["userId"]
            if self._pending:
                self._before_change(customer)
            profile = self.profiles.pop(customer, None)
            if profile is not None:
                self._mark_deleted(customer)
                self.timers.discard(customer)
                if self.insight is not None:
                    self.insight.on_removed(profile)
            self.aliases[customer] = target
            self._dirty_aliases.add(customer)
            self._unaliased.discard(customer)
            self._send(
                target,
                {
                    "type": "_merge_in",
                    "customer": target,
                    "from": customer,
                    "profile": profile.to_dict() if profile is not None else None,
                    "merge": event.get("merge"),
                    "ts": event["ts"],
                },
            )
            return APPLIED
        if kind == "_merge_in":
            if erased_key(customer) in self.erased:
                return DROPPED
            if customer in self.aliases:  # merged away meanwhile: follow it
                path = event.get("path") or []
                target = self.aliases[customer]
                end = None
                if customer in path and target in path:
                    # Back where it passed before, and still going round: these ids
                    # were merged into each other at once (aliases A to B and B to A
                    # in one batch), each profile left for the next, and all of them
                    # would bounce around the loop until dropped. Every profile in it,
                    # having gone round once, picks the same id (the least) to end the
                    # loop on. (A loop broken since, its end merged on elsewhere, is
                    # no loop any more: the profile follows the aliases like any other.)
                    end = event.get("loop_end") or min(path[path.index(customer) :])
                if end != customer:
                    onward = {**event, "customer": target, "path": [*path, customer]}
                    onward.pop("loop_end", None)
                    if end is not None:
                        onward["loop_end"] = end
                    return self._forward(target, onward)
                # The loop ends here: this id holds a profile again, and the others
                # land on it.
                del self.aliases[customer]
                self._unalias(customer)
            source = event["from"]
            if self._pending:
                self._before_change(customer)
            profile = self.profiles.get(customer)
            if profile is None:
                profile = self.profiles[customer] = Profile(customer)
                self._deleted.discard(customer)
            merge = event.get("merge")
            if merge is None:  # sent before merges had ids: the source id is all there is
                if source in profile.merged_ids:
                    return DUPLICATE
            elif profile.merges is not None and merge in profile.merges:
                # The same merge again (forwards are delivered at least once). Not by
                # source id: after a loop of merges (above), two profiles can come from
                # one id, the loop's end and the id's own first profile still going round.
                return DUPLICATE
            if event.get("profile") is not None:
                other = Profile.from_dict(event["profile"])
                merge_profiles(profile, other, self.limits)
                merge_journey(profile.journey, other.journey, other.id)
                if self.insight is not None:
                    self.insight.on_merged(profile, event["ts"])
                if self.rules is not None:
                    self.timers.schedule(customer, self.rules.next_deadline(profile))
            if source not in profile.merged_ids:
                profile.merged_ids.append(source)
            if merge is not None:
                if profile.merges is None:
                    profile.merges = []
                profile.merges.append(merge)
            if source in profile.merging:
                profile.merging.remove(source)
            self._dirty.add(customer)
            return APPLIED
        if kind == "_erase":
            key = erased_key(customer)
            if key not in self.erased:
                self.erased.add(key)
                self._new_erased.append(key)
            if self._pending:
                self._before_change(customer)
            profile = self.profiles.pop(customer, None)
            self.timers.discard(customer)
            if profile is not None:
                self._mark_deleted(customer)
                if self.insight is not None:
                    self.insight.on_removed(profile)
                for old in profile.merged_ids + profile.merging:
                    self._send(
                        old,
                        {
                            "type": "_unalias",
                            "customer": old,
                            "userId": customer,
                            "ts": event["ts"],
                        },
                    )
            if self.aliases.pop(customer, None) is not None:
                self._unalias(customer)
            return APPLIED
        if kind == "_unalias":
            if self.aliases.get(customer) == event["userId"]:
                del self.aliases[customer]
                self._unalias(customer)
            return APPLIED
        return DROPPED

    # -- rules --------------------------------------------------------------------
    def _decided(self, profile: Profile, sends: list) -> None:
        for send in sends:
            self._sends.append(send.to_dict())
        self.sent += len(sends)
        self.timers.schedule(profile.id, self.rules.next_deadline(profile))

    def tick(self, now: float) -> int:
        """Fire every timer due at or before `now`; returns how many sends that decided."""
        if self.rules is None:
            return 0
        before = self.sent
        insight = self.insight
        failed: Exception | None = None
        for customer in self.timers.pop_due(now):
            profile = self.profiles.get(customer)
            if profile is None:
                continue
            if self._pending:
                self._before_change(customer)
            self._dirty.add(customer)
            try:
                if insight is not None:
                    insight.refresh(profile, now)  # RFM recency, before segments are re-checked
                self._decided(profile, self.rules.on_due(profile, now))
            except Exception as exc:  # raised after the rest: they left the index with it
                failed = failed or exc
        if failed is not None:
            raise failed
        return self.sent - before

    def score(self, models: dict[str, Any], now: float) -> int:
        """Score the customers whose features changed; segments follow. Returns how many."""
        if self.insight is None:
            return 0
        self.encode_pending()  # scoring may change any profile
        changed = self.insight.score(self.profiles, models, now)
        for profile in changed:
            self._dirty.add(profile.id)
            if self.rules is not None:
                self._decided(profile, self.rules.on_change(profile, now))
        return len(changed)

    def segment_members(self, name: str, limit: int) -> dict:
        """Count and up to `limit` ids of this shard's members of segment `name`.

        A segment declared in the rules, or an RFM segment name (champions, ...).
        """
        from engine.insight.rfm import SEGMENTS

        declared = self.rules is not None and any(s.name == name for s in self.rules.segments)
        if declared:

            def member(p: Profile) -> bool:
                return name in (p.journey.get("seg") or ())
        elif name in SEGMENTS:

            def member(p: Profile) -> bool:
                return p.rfm is not None and p.rfm.get("segment") == name
        else:
            return {"known": False, "count": 0, "members": []}
        count, members = 0, []
        for customer, profile in self.profiles.items():
            if member(profile):
                count += 1
                if len(members) < limit:
                    members.append(customer)
        return {"known": True, "count": count, "members": members}

    def next_deadline(self) -> float | None:
        """The earliest pending timer of any customer here."""
        return self.timers.next_deadline()

    def explain(self, customer_id: str, now: float) -> list[dict] | str | None:
        """Per rule, why `customer_id` did or did not get an email (see RuleSet.explain)."""
        found = self.lookup(customer_id)
        if not isinstance(found, Profile):
            return found
        return self.rules.explain(found, now) if self.rules is not None else []

    def _mark_deleted(self, customer: str) -> None:
        self._dirty.discard(customer)
        self._deleted.add(customer)

    def _unalias(self, customer: str) -> None:
        self._dirty_aliases.discard(customer)
        self._unaliased.add(customer)

    def _forward(self, target: str, event: dict) -> str:
        hops = event.get("_hops", 0) + 1
        if hops > MAX_ALIAS_HOPS:  # an alias cycle; refuse rather than loop
            return DROPPED
        self._send(target, {**event, "_hops": hops})
        return FORWARDED

    def _send(self, target: str, event: dict) -> None:
        if self.owns(target):
            self.apply(event)
        else:
            self._forwards.append((target, event))

    # -- checkpoints ------------------------------------------------------------
    def has_urgent_changes(self) -> bool:
        """True while changes wait that should not wait for a long checkpoint interval:
        forwards (merges, events for another shard's customers) leave only with a
        checkpoint, and an erased or merged-away profile stays in Redis until one."""
        return bool(self._forwards or self._new_erased or self._deleted)

    def take_sends(self) -> list[dict]:
        """Hand over the sends decided since the last call (they leave before the checkpoint)."""
        sends, self._sends = self._sends, []
        return sends

    def take_changes(self) -> Changes:
        """Encode and hand over everything changed since the last call."""
        changes = self.begin_changes()
        self.encode_pending()
        return changes

    def begin_changes(self) -> Changes:
        """Hand over everything changed since the last call; its profiles are encoded
        into `changes.profiles` by `encode_pending`, or just before they next change.

        Until `encode_pending` has returned True, no other checkpoint may begin.
        """
        if self._pending:
            raise RuntimeError("a checkpoint is still being encoded")
        profiles = self.profiles
        self._pending = {cid: profiles[cid] for cid in self._dirty}
        self._encoded = {}
        changes = Changes(
            profiles=self._encoded,
            deleted=list(self._deleted),
            aliases={old: self.aliases[old] for old in self._dirty_aliases},
            unaliased=list(self._unaliased),
            erased=self._new_erased,
            forwards=self._forwards,
            sends=self._sends,
        )
        self._dirty = set()
        self._deleted = set()
        self._dirty_aliases = set()
        self._unaliased = set()
        self._new_erased = []
        self._forwards = []
        self._sends = []
        return changes

    def encode_pending(self, budget_s: float | None = None) -> bool:
        """Encode the begun checkpoint's profiles, for about `budget_s` (None: all);
        True once none is left."""
        pending, encoded = self._pending, self._encoded
        until = time.perf_counter() + budget_s if budget_s is not None else None
        while pending:
            cid, profile = pending.popitem()
            encoded[cid] = orjson.dumps(profile.to_dict())
            if until is not None and time.perf_counter() >= until:
                break
        if pending:
            return False
        # Done: the checkpoint's Changes holds the encoded profiles until they are
        # written; the partition keeping them too would hold a whole checkpoint
        # in memory until the next one begins.
        self._encoded = {}
        return True

    def _before_change(self, customer: str) -> None:
        # The checkpoint being taken must hold this profile as it is now.
        profile = self._pending.pop(customer, None)
        if profile is not None:
            self._encoded[customer] = orjson.dumps(profile.to_dict())

    def restore(self, profiles: dict[bytes | str, bytes], aliases: dict, erased: set) -> None:
        """Load a checkpoint (as read back from the store) into an empty partition."""
        self.profiles = {
            (k.decode() if isinstance(k, bytes) else k): Profile.from_dict(orjson.loads(v))
            for k, v in profiles.items()
        }
        self.aliases = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in aliases.items()
        }
        self.erased = {k.decode() if isinstance(k, bytes) else k for k in erased}
        if self.insight is not None:
            self.insight.rebuild(self.profiles.values())
        self.timers = TimerIndex()
        if self.rules is not None:
            self.timers = TimerIndex.rebuild(
                (cid, self.rules.next_deadline(p)) for cid, p in self.profiles.items()
            )

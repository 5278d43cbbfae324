"""One shard's state without I/O (engine.partition): identity merges across
partitions, erasure, checkpoints, and the replay invariants the shard relies on."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.events import normalize
from engine.partition import (
    APPLIED,
    DROPPED,
    DUPLICATE,
    FORWARDED,
    Partition,
    erased_key,
)
from engine.profile import Limits, Profile
from engine.routing import shard_for

SHARDS = 3
T0 = 1_700_000_000.0
_ids = itertools.count()


# -- building events -------------------------------------------------------------------


def event(msg: dict, kind: str, at: float = T0) -> dict:
    """`msg` normalized as the API stores it (a fresh messageId unless it names one)."""
    return normalize({"messageId": f"m{next(_ids)}", **msg}, kind=kind, received_at=at)


def track(customer: str, name: str = "Product Viewed", *, anon: bool = False, **props) -> dict:
    who = {"anonymousId": customer} if anon else {"userId": customer}
    return event({**who, "event": name, "properties": props}, "track")


def identify(user: str, anon: str | None = None, **traits) -> dict:
    msg = {"userId": user, "traits": traits}
    if anon is not None:
        msg["anonymousId"] = anon
    return event(msg, "identify")


def alias(user: str, previous: str) -> dict:
    return event({"userId": user, "previousId": previous}, "alias")


def erase(customer: str, at: float = T0) -> dict:
    """What DELETE /v1/profiles/{id} writes to the stream."""
    return {
        "type": "_erase",
        "customer": customer,
        "userId": customer,
        "anonymousId": None,
        "messageId": f"erase-{next(_ids)}",
        "ts": at,
        "receivedAt": at,
    }


def on_shards(*prefixes: str) -> list[str]:
    """One id per prefix, each on a different shard."""
    chosen: list[str] = []
    for prefix in prefixes:
        taken = {shard_for(c, SHARDS) for c in chosen}
        chosen.append(
            next(
                f"{prefix}-{n}"
                for n in range(1000)
                if shard_for(f"{prefix}-{n}", SHARDS) not in taken
            )
        )
    return chosen


# -- a tiny cluster: partitions, their streams, checkpoints and a router ---------------


@dataclass
class Checkpoint:
    """What the store keeps for one shard: encoded profiles, aliases, erasures, position."""

    profiles: dict[str, bytes] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    erased: set[str] = field(default_factory=set)
    pos: int = 0


class Cluster:
    """Partitions fed from per-shard streams; forwards travel as the store carries them:
    taken with a checkpoint, then appended to the owner's stream, in order."""

    def __init__(self, shards: int = SHARDS, limits: Limits | None = None) -> None:
        self.shards = shards
        self.limits = limits
        self.parts = [self._partition(i) for i in range(shards)]
        self.streams: list[list[dict]] = [[] for _ in range(shards)]
        self.pos = [0] * shards
        self.saved = [Checkpoint() for _ in range(shards)]

    def _partition(self, index: int) -> Partition:
        def owns(customer: str) -> bool:
            return shard_for(customer, self.shards) == index

        return Partition(owns, limits=self.limits)

    def owner(self, customer: str) -> int:
        return shard_for(customer, self.shards)

    def part(self, customer: str) -> Partition:
        return self.parts[self.owner(customer)]

    # stream and checkpoint steps
    def append(self, event: dict) -> int:
        index = self.owner(event["customer"])
        self.streams[index].append(event)
        return index

    def pump(self, index: int, until: int | None = None) -> list[str]:
        stream, outcomes = self.streams[index], []
        end = len(stream) if until is None else until
        while self.pos[index] < end:
            outcomes.append(self.parts[index].apply(stream[self.pos[index]]))
            self.pos[index] += 1
        return outcomes

    def checkpoint(self, index: int) -> int:
        changes = self.parts[index].take_changes()
        saved = self.saved[index]
        saved.profiles.update(changes.profiles)
        for cid in changes.deleted:
            saved.profiles.pop(cid, None)
        saved.aliases.update(changes.aliases)
        for old in changes.unaliased:
            saved.aliases.pop(old, None)
        saved.erased.update(changes.erased)
        saved.pos = self.pos[index]
        for target, event in changes.forwards:
            self.streams[self.owner(target)].append(event)
        return len(changes.forwards)

    def crash(self, index: int) -> None:
        """Lose the partition; recover it from its checkpoint and replay its stream."""
        was_at = self.pos[index]
        saved = self.saved[index]
        fresh = self._partition(index)
        fresh.restore(
            {cid.encode(): data for cid, data in saved.profiles.items()},
            {old.encode(): new.encode() for old, new in saved.aliases.items()},
            {key.encode() for key in saved.erased},
        )
        self.parts[index] = fresh
        self.pos[index] = saved.pos
        self.pump(index, until=was_at)

    def settle(self) -> None:
        """Apply and checkpoint until no stream has anything left and no forward is in flight."""
        for _ in range(100):
            moved = 0
            for index in range(self.shards):
                moved += len(self.pump(index))
                moved += self.checkpoint(index)
            if not moved:
                return
        raise AssertionError("forwards did not settle")

    # the API's view
    def send(self, event: dict) -> str:
        """Deliver one event and everything it sets moving; the event's own outcome."""
        index = self.append(event)
        [outcome] = self.pump(index, until=len(self.streams[index]))
        self.settle()
        return outcome

    def lookup(self, customer: str) -> Profile | None:
        found = self.part(customer).lookup(customer)
        for _ in range(10):
            if not isinstance(found, str):
                return found
            found = self.part(found).lookup(found)
        raise AssertionError("alias chain too long")

    def state(self) -> list[dict]:
        return [
            {
                "profiles": {cid: p.to_dict() for cid, p in part.profiles.items()},
                "aliases": dict(part.aliases),
                "erased": set(part.erased),
            }
            for part in self.parts
        ]


# -- identity ------------------------------------------------------------------------


def test_identify_merges_the_anonymous_profile_from_another_partition() -> None:
    cluster = Cluster()
    user, anon = on_shards("user", "anon")
    assert cluster.send(track(anon, anon=True, product_id="p1")) == APPLIED
    cluster.send(track(anon, "Product Added", anon=True, product_id="p1", price=2.0))
    cluster.send(identify(user, plan="gold"))
    assert cluster.part(anon).lookup(anon).anonymous

    assert cluster.send(identify(user, anon, email="u@example.com")) == APPLIED

    profile = cluster.lookup(user)
    assert profile.merged_ids == [anon] and profile.merging == []
    assert profile.counts == {"Product Viewed": 1, "Product Added": 1}
    assert list(profile.cart) == ["p1"]
    assert profile.traits == {"plan": "gold", "email": "u@example.com"}
    assert cluster.part(anon).profiles == {}
    assert cluster.part(anon).lookup(anon) == user
    assert cluster.lookup(anon) is profile


def test_later_anonymous_events_are_forwarded_to_the_user() -> None:
    cluster = Cluster()
    user, anon = on_shards("user", "anon")
    cluster.send(track(anon, anon=True))
    cluster.send(identify(user, anon))
    assert cluster.send(track(anon, "Product Added", anon=True, product_id="p2")) == FORWARDED
    assert cluster.send(track(anon, anon=True)) == FORWARDED
    profile = cluster.lookup(user)
    assert profile.counts == {"Product Viewed": 2, "Product Added": 1}
    assert list(profile.cart) == ["p2"]
    assert cluster.part(anon).profiles == {}  # nothing recreated on the old partition
    assert cluster.part(user).stats[APPLIED] >= 4


def test_a_repeated_merge_is_idempotent() -> None:
    cluster = Cluster()
    user, anon = on_shards("user", "anon")
    cluster.send(track(anon, "Order Completed", anon=True, revenue=10))
    cluster.send(identify(user, anon))
    before = cluster.lookup(user).to_dict()
    # Every SDK call after login carries both ids.
    cluster.send(identify(user, anon))
    cluster.send(track(user, "Order Completed", revenue=5))
    profile = cluster.lookup(user)
    assert profile.merged_ids == [anon] and profile.merging == []
    assert (profile.orders, profile.revenue) == (2, 15.0)
    assert before["orders"] == 1
    # The store delivers forwards at least once: replayed merge messages change nothing
    # (these carry no merge id, as sent before merges had one: known by their source id).
    replay_out = {"type": "_merge_out", "customer": anon, "userId": user, "ts": T0}
    assert cluster.send(replay_out) == APPLIED
    assert cluster.lookup(user).orders == 2
    replay_in = {"type": "_merge_in", "customer": user, "from": anon, "profile": None, "ts": T0}
    assert cluster.send(replay_in) == DUPLICATE
    assert cluster.lookup(user).to_dict() == profile.to_dict()


class TwiceCluster(Cluster):
    """Every forward is delivered twice, as the store may (at least once)."""

    def checkpoint(self, index: int) -> int:
        changes = self.parts[index].take_changes()
        self.parts[index]._forwards = [*changes.forwards, *changes.forwards]
        self.parts[index]._dirty |= set(changes.profiles)
        return super().checkpoint(index)


def test_merge_messages_delivered_twice_count_once() -> None:
    once, twice = Cluster(), TwiceCluster()
    user, anon = on_shards("user", "anon")
    events = [
        track(anon, "Order Completed", anon=True, revenue=10),
        identify(user, anon),
        track(user, "Order Completed", revenue=5),
    ]
    for cluster in (once, twice):
        for sent in events:
            cluster.send(dict(sent))
    profile = twice.lookup(user)
    assert (profile.orders, profile.revenue) == (2, 15.0)
    assert profile.merged_ids == [anon] and len(profile.merges) == 1
    assert twice.part(user).stats[DUPLICATE] >= 1  # the second copy came, and counted for nothing
    assert profile.to_dict() == once.lookup(user).to_dict()


def test_a_profile_checkpointed_before_merge_ids_loads() -> None:
    data = Profile("old").to_dict()
    del data["merges"]
    assert Profile.from_dict(data).merges is None


def test_same_partition_merge_happens_at_once() -> None:
    part = Partition(lambda c: True)
    part.apply(track("a1", anon=True))
    assert part.apply(identify("u1", "a1")) == APPLIED
    assert part.lookup("a1") == "u1"
    assert part.lookup("u1").counts == {"Product Viewed": 1}
    assert part.lookup("u1").merged_ids == ["a1"]
    assert part.take_changes().forwards == []


def test_alias_merges_the_previous_id() -> None:
    cluster = Cluster()
    new, old = on_shards("new", "old")
    cluster.send(track(old, "Order Completed", revenue=10))
    cluster.send(identify(old, name="Old"))
    cluster.send(identify(new, name="New"))
    assert cluster.send(alias(new, old)) == APPLIED
    profile = cluster.lookup(new)
    assert (profile.orders, profile.revenue) == (1, 10.0)
    assert profile.traits == {"name": "New"} and profile.merged_ids == [old]
    assert cluster.part(old).lookup(old) == new


def test_events_for_an_aliased_user_id_follow_the_alias() -> None:
    cluster = Cluster()
    new, old = on_shards("new", "old")
    cluster.send(track(old, "Order Completed", revenue=10))
    cluster.send(alias(new, old))
    # A server still using the old id: its events land on the merged profile,
    # never on a new profile for the old id that would shadow the alias.
    assert cluster.send(track(old, "Order Completed", revenue=4)) == FORWARDED
    assert cluster.part(old).profiles == {}
    assert cluster.lookup(old) is cluster.lookup(new)
    assert cluster.lookup(new).orders == 2


def test_a_merge_into_an_id_that_was_aliased_meanwhile_follows_the_alias() -> None:
    # old logs in on a device (anon), and before that merge lands old is aliased to new.
    cluster = Cluster()
    new, old, anon = on_shards("new", "old", "anon")
    cluster.send(track(anon, "Product Added", anon=True, product_id="p1"))
    cluster.send(track(old, "Order Completed", revenue=3))
    i_new, i_old, i_anon = (cluster.owner(c) for c in (new, old, anon))

    cluster.append(identify(old, anon))
    cluster.pump(i_old)
    cluster.checkpoint(i_old)  # _merge_out waits in anon's stream
    cluster.append(alias(new, old))
    cluster.pump(i_new)
    cluster.checkpoint(i_new)  # _merge_out waits in old's stream
    cluster.pump(i_old)  # old's profile leaves for new; old becomes an alias
    cluster.checkpoint(i_old)
    cluster.pump(i_anon)  # anon's profile leaves for old ...
    cluster.checkpoint(i_anon)
    cluster.settle()  # ... and must end up with new

    assert cluster.part(old).profiles == {}
    profile = cluster.lookup(new)
    assert cluster.lookup(anon) is profile and cluster.lookup(old) is profile
    assert profile.counts == {"Product Added": 1, "Order Completed": 1}
    assert sorted(profile.merged_ids) == sorted([old, anon])


# -- erasure ------------------------------------------------------------------------


def test_erase_removes_the_profile_and_its_aliases() -> None:
    cluster = Cluster()
    user, anon = on_shards("user", "anon")
    cluster.send(track(anon, "Product Added", anon=True, product_id="p1"))
    cluster.send(identify(user, anon, email="u@example.com"))
    assert cluster.send(erase(user)) == APPLIED

    owner = cluster.part(user)
    assert cluster.lookup(user) is None and cluster.lookup(anon) is None
    assert owner.profiles == {} and cluster.part(anon).aliases == {}
    assert owner.erased == {erased_key(user)}
    assert user not in repr(cluster.state())  # only a digest is kept
    assert cluster.saved[cluster.owner(user)].profiles == {}
    assert cluster.saved[cluster.owner(user)].erased == {erased_key(user)}
    assert cluster.saved[cluster.owner(anon)].aliases == {}


def test_erasing_while_a_merge_is_in_flight_unlinks_the_device() -> None:
    cluster = Cluster()
    user, anon = on_shards("user", "anon")
    cluster.send(track(anon, "Product Added", anon=True, product_id="p1"))
    i_user, i_anon = cluster.owner(user), cluster.owner(anon)
    cluster.append(identify(user, anon))
    cluster.pump(i_user)
    assert cluster.part(user).lookup(user).merging == [anon]
    cluster.append(erase(user))  # before the merge reached the device's partition
    cluster.pump(i_user)
    cluster.settle()
    assert cluster.lookup(user) is None
    assert cluster.part(anon).aliases == {} and cluster.part(anon).profiles == {}
    assert cluster.saved[i_anon].aliases == {} and cluster.saved[i_anon].profiles == {}
    assert cluster.part(user).profiles == {}  # the carried history was dropped
    assert cluster.send(track(anon, "Page Viewed", anon=True)) == APPLIED
    assert cluster.lookup(anon).counts == {"Page Viewed": 1}


def test_events_for_an_erased_id_are_dropped() -> None:
    cluster = Cluster()
    user, anon = on_shards("user", "anon")
    cluster.send(track(user))
    cluster.send(erase(user))
    assert cluster.send(track(user, "Order Completed", revenue=1)) == DROPPED
    assert cluster.send(identify(user, email="again@example.com")) == DROPPED
    assert cluster.lookup(user) is None
    # An erased anonymous id is never linked to anyone again.
    cluster.send(track(anon, anon=True))
    cluster.send(erase(anon))
    other = "someone-else"
    cluster.send(identify(other, anon))
    assert cluster.lookup(anon) is None
    assert cluster.part(anon).aliases == {}
    assert cluster.lookup(other).counts == {}
    # Erasing twice is harmless and records nothing new.
    assert cluster.send(erase(user)) == APPLIED
    part = Partition(lambda c: True)
    part.apply(erase(user))
    assert part.take_changes().erased == [erased_key(user)]
    assert part.apply(erase(user)) == APPLIED
    assert not part.take_changes()


def test_an_anonymous_id_starts_afresh_after_its_user_is_erased() -> None:
    cluster = Cluster()
    user, anon = on_shards("user", "anon")
    cluster.send(track(anon, anon=True))
    cluster.send(identify(user, anon))
    cluster.send(erase(user))
    assert cluster.send(track(anon, "Page Viewed", anon=True)) == APPLIED
    fresh = cluster.lookup(anon)
    assert fresh.id == anon and fresh.counts == {"Page Viewed": 1}  # no erased history


# -- checkpoints ---------------------------------------------------------------------


def test_take_changes_hands_over_exactly_what_changed() -> None:
    part = Partition(lambda c: True)
    part.apply(track("a"))
    part.apply(track("b", "Product Added", product_id="p1"))
    first = part.take_changes()
    assert set(first.profiles) == {"a", "b"}
    assert orjson.loads(first.profiles["b"])["cart"]["p1"]["quantity"] == 1
    assert not part.take_changes()

    part.apply(track("b"))
    part.apply(track("x", anon=True))
    part.apply(identify("u", "x"))
    changes = part.take_changes()
    assert set(changes.profiles) == {"b", "u"}
    assert changes.deleted == ["x"] and changes.aliases == {"x": "u"}
    assert changes.forwards == [] and changes.erased == []

    part.apply(erase("u"))
    changes = part.take_changes()
    assert changes.profiles == {} and changes.deleted == ["u"]
    assert changes.unaliased == ["x"] and changes.erased == [erased_key("u")]


def test_take_changes_encodes_a_snapshot_not_a_live_view() -> None:
    part = Partition(lambda c: True)
    part.apply(track("a", "Product Added", product_id="p1"))
    changes = part.take_changes()
    part.apply(track("a", "Product Added", product_id="p1"))  # after the snapshot
    assert orjson.loads(changes.profiles["a"])["cart"]["p1"]["quantity"] == 1


def test_a_finished_checkpoint_leaves_its_encoded_profiles_to_the_changes_alone() -> None:
    import gc

    part = Partition(lambda c: True)
    for n in range(3):
        part.apply(track(f"c{n}", "Product Added", product_id="p1"))
    changes = part.take_changes()
    assert set(changes.profiles) == {"c0", "c1", "c2"}
    # Held by the partition too, a whole checkpoint would stay in memory until the
    # next one began (6.7 KB per profile on the ingest benchmark's memory figure).
    holders = gc.get_referrers(changes.profiles)
    assert not any(r is part or r is getattr(part, "__dict__", None) for r in holders)


def test_restore_gives_equal_profiles() -> None:
    part = Partition(lambda c: True)
    for ev in [
        identify("u", "a0", name="Ann"),
        track("a1", "Product Added", anon=True, product_id="p1", price=2),
        identify("u", "a1"),
        track("u", "Order Completed", revenue=12, products=[{"product_id": "p9"}]),
        track("u", "Unsubscribed"),
        track("v", "Email Opened"),
    ]:
        part.apply(ev)
    changes = part.take_changes()
    restored = Partition(lambda c: True)
    restored.restore(
        {cid.encode(): data for cid, data in changes.profiles.items()},
        {old.encode(): new.encode() for old, new in changes.aliases.items()},
        {key.encode() for key in changes.erased},
    )
    assert {c: p.to_dict() for c, p in restored.profiles.items()} == {
        c: p.to_dict() for c, p in part.profiles.items()
    }
    assert restored.aliases == part.aliases == {"a0": "u", "a1": "u"}
    assert restored.lookup("a1") == "u" and restored.lookup("u").suppressed
    # and it goes on deduping what it had seen
    seen = track("v", "Email Opened")
    part.apply(seen)
    assert restored.apply(seen) == APPLIED and restored.apply(dict(seen)) == DUPLICATE


# -- invariants (hypothesis) ---------------------------------------------------------

# Three people, each with a user id, two devices (anonymous ids) and an older user id.
USERS = on_shards("user", "user", "user")
DEVICES = [on_shards(f"dev{i}a", f"dev{i}b") for i in range(3)]
OLD_IDS = [on_shards(f"old{i}")[0] for i in range(3)]
ANONS = [d for pair in DEVICES for d in pair]
EVERY_ID = USERS + ANONS + OLD_IDS
NAMES = ["Product Viewed", "Product Added", "Product Removed", "Order Completed"]


@st.composite
def messages(draw: st.DrawFn, *, tidy: bool) -> list[dict]:
    """A random stretch of traffic. Tidy: each id only ever joins its own person;
    otherwise devices change hands and aliases point anywhere (even in cycles)."""
    out: list[dict] = []
    for n in range(draw(st.integers(1, 25))):
        person = draw(st.integers(0, 2))
        user = USERS[person]
        device = draw(st.sampled_from(DEVICES[person] if tidy else ANONS))
        previous = OLD_IDS[person] if tidy else draw(st.sampled_from(EVERY_ID))
        props = {"product_id": draw(st.sampled_from(["p1", "p2"])), "price": 3, "revenue": 2}
        name = draw(st.sampled_from(NAMES))
        what = draw(
            st.sampled_from(["user", "user", "device", "old", "identify", "login", "alias"])
        )
        if what in ("user", "device", "old"):
            who = {"user": {"userId": user}, "device": {"anonymousId": device}}.get(
                what, {"userId": previous}
            )
            msg, kind = {**who, "event": name, "properties": props}, "track"
        elif what == "identify":
            msg, kind = {"userId": user, "traits": {"n": n}}, "identify"
        elif what == "login":
            msg, kind = {"userId": user, "anonymousId": device, "traits": {"at": n}}, "identify"
        else:
            msg, kind = {"userId": user, "previousId": previous}, "alias"
        out.append(event(msg, kind, T0 + n))
    return out


def steps(draw: st.DrawFn, count: int) -> list[tuple[str, int]]:
    """Interleave sending `count` events with pumping and checkpointing random shards."""
    shard = st.integers(0, SHARDS - 1)
    plan: list[tuple[str, int]] = [("send", n) for n in range(count)]
    for _ in range(draw(st.integers(0, 3 * count))):
        at = draw(st.integers(0, len(plan)))
        plan.insert(at, (draw(st.sampled_from(["pump", "checkpoint"])), draw(shard)))
    return plan


def run(cluster: Cluster, plan: list[tuple[str, int]], events: list[dict]) -> None:
    for op, arg in plan:
        if op == "send":
            cluster.append(events[arg])
        elif op == "dup":
            cluster.append(retry_of(events[arg]))
        elif op == "pump":
            cluster.pump(arg)
        elif op == "checkpoint":
            cluster.checkpoint(arg)
        elif op == "crash":
            cluster.crash(arg)
    cluster.settle()


def retry_of(original: dict) -> dict:
    """An SDK retry: the same messageId, received a little later."""
    return {**original, "receivedAt": original["receivedAt"] + 30.0}


SLOW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(messages(tidy=True), st.data())
def test_duplicate_deliveries_change_nothing(events: list[dict], data: st.DataObject) -> None:
    # Tidy traffic and no erasure: a retry whose original went to a device's former
    # owner, or to an erased person, is not recognised: dedupe memory lives in profiles.
    plan = steps(data.draw, len(events))
    ordered: list[tuple[str, int]] = []
    sent = 0
    for op, arg in plan:
        ordered.append((op, arg))
        sent += op == "send"
        for _ in range(data.draw(st.integers(0, 1 if sent else 0), label="retries")):
            # a retry of an event already sent: right away or several steps later
            ordered.append(("dup", data.draw(st.integers(0, sent - 1), label="retry of")))

    straight, retried = Cluster(), Cluster()
    run(straight, plan, events)
    run(retried, ordered, events)
    assert retried.state() == straight.state()

    # and it was dedupe that ignored every retry
    def duplicates(cluster: Cluster) -> int:
        return sum(p.stats[DUPLICATE] for p in cluster.parts)

    assert duplicates(retried) - duplicates(straight) == sum(op == "dup" for op, _ in ordered)


@SLOW
@given(messages(tidy=False), st.data())
def test_a_crash_and_restore_anywhere_is_invisible(events: list[dict], data: st.DataObject) -> None:
    events = [*events, erase(data.draw(st.sampled_from(EVERY_ID)), at=T0 + 50)]
    events += [event({"anonymousId": a, "event": "Page Viewed"}, "track", T0 + 60) for a in ANONS]
    plan = steps(data.draw, len(events))
    crashes = data.draw(st.lists(st.integers(0, len(plan)), min_size=1, max_size=3))
    crashed = list(plan)
    for at in sorted(crashes, reverse=True):
        crashed.insert(at, ("crash", data.draw(st.integers(0, SHARDS - 1))))

    straight, restored = Cluster(), Cluster()
    run(straight, plan, events)
    run(restored, crashed, events)
    assert restored.state() == straight.state()
    # and after settling, every checkpoint holds exactly the live state
    for index in range(SHARDS):
        restored.crash(index)
    assert restored.state() == straight.state()


# -- checkpoints encoded a slice at a time, events applied in between ---------------------

_STARTER_RULES = None


def _starter_rules():  # compiled once: every example shares them (they hold no state)
    global _STARTER_RULES
    if _STARTER_RULES is None:
        from engine.config import load
        from engine.rules import RuleSet
        from tests.conftest import ROOT

        _STARTER_RULES = RuleSet.from_sources(load(ROOT / "config.toml", env={}).rules)
    return _STARTER_RULES


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=messages(tidy=False), data=st.data())
def test_a_checkpoint_encoded_in_slices_holds_each_profile_as_it_was_when_it_began(
    events: list[dict], data: st.DataObject
) -> None:
    part = Partition(lambda customer: True, rules=_starter_rules())
    ops = [("apply", n) for n in range(len(events))]
    kinds = st.sampled_from(["begin", "encode", "encode", "tick", "erase"])
    for _ in range(data.draw(st.integers(1, 3 * len(events)))):
        ops.insert(data.draw(st.integers(0, len(ops))), (data.draw(kinds), 0))
    now, begun, expected, checked = T0, None, {}, 0

    def finish() -> None:
        nonlocal begun, checked
        while not part.encode_pending(0.0):
            pass
        assert begun.profiles == expected
        begun, checked = None, checked + 1

    for op, n in ops:
        if op == "apply":
            part.apply({**events[n], "receivedAt": max(events[n]["receivedAt"], now)})
        elif op == "begin" and begun is None:
            # What encoding every changed profile right now (the old way) would give.
            expected = {cid: orjson.dumps(part.profiles[cid].to_dict()) for cid in part._dirty}
            begun = part.begin_changes()
        elif op == "encode" and begun is not None and part.encode_pending(0.0):
            finish()  # budget 0: one profile per call
        elif op == "tick":
            now += 3600.0  # past the starter rules' waits: timers fire and change profiles
            part.tick(now)
        elif op == "erase" and part.profiles:
            victim = data.draw(st.sampled_from(sorted(part.profiles)))
            part.apply(erase(victim, at=now))
    if begun is not None:
        finish()
    assert checked or not any(op == "begin" for op, _ in ops)


def test_erasures_and_forwards_are_urgent_changes_until_a_checkpoint_takes_them() -> None:
    part = Partition(lambda c: c != "elsewhere")
    part.apply(track("ann"))
    assert not part.has_urgent_changes()  # an ordinary event waits for the interval
    part.apply(erase("ann"))
    assert part.has_urgent_changes()
    part.take_changes()
    assert not part.has_urgent_changes()
    part.apply(identify("bob", "elsewhere"))  # the device lives on another partition
    assert part.has_urgent_changes()


class _FailingFor:
    """The starter rules, failing for one customer: a bug in a rule, a value it chokes on."""

    def __init__(self, rules: object, bad: str) -> None:
        self._rules, self._bad = rules, bad

    def __getattr__(self, name: str) -> object:
        return getattr(self._rules, name)

    def on_event(self, profile: Profile, event: dict, now: float) -> list:
        if profile.id == self._bad:
            raise ValueError("year -7973 is out of range")
        return self._rules.on_event(profile, event, now)

    def on_due(self, profile: Profile, now: float) -> list:
        if profile.id == self._bad:
            raise ValueError("year -7973 is out of range")
        return self._rules.on_due(profile, now)


def test_a_rule_that_fails_on_one_event_loses_neither_its_merge_nor_its_change() -> None:
    user, anon = on_shards("user", "anon")
    part = Partition(
        lambda c: shard_for(c, SHARDS) == shard_for(user, SHARDS),
        rules=_FailingFor(_starter_rules(), user),
    )
    try:
        part.apply(identify(user, anon, email="u@example.com"))
    except ValueError:
        pass
    else:
        raise AssertionError("the rule's failure reaches the shard, which counts it")
    changes = part.take_changes()
    assert user in changes.profiles  # checkpointed as it is in memory
    assert [(target, e["type"]) for target, e in changes.forwards] == [(anon, "_merge_out")]


def test_a_timer_that_fails_for_one_customer_still_fires_the_others() -> None:
    rules = _FailingFor(_starter_rules(), "nobody yet")
    part = Partition(lambda c: True, rules=rules)
    for customer in ("bad", "good"):
        part.apply(track(customer, "Product Added", product_id="p1", price=5.0))
    part.take_sends()
    rules._bad = "bad"
    sends, failures = [], 0
    for _ in range(5):  # the reminder is due in 15 minutes, then deferred by quiet hours
        due = part.next_deadline()
        if due is None:
            break
        try:
            part.tick(due)
        except ValueError:  # raised once the other timers have fired
            failures += 1
        sends += part.take_sends()
    assert failures == 1
    assert sends and {s["customer"] for s in sends} == {"good"}  # bad's timers are gone
    assert sends[0]["rule"] == "cart_abandonment"


def _all_profiles(cluster: Cluster) -> dict[str, Profile]:
    return {cid: p for part in cluster.parts for cid, p in part.profiles.items()}


def test_ids_merged_into_each_other_at_once_end_in_one_profile() -> None:
    # alias(A to B) and alias(B to A) in one batch: each shard gave its profile to the
    # other, both became aliases of each other, and the profiles bounced until dropped.
    cluster = Cluster()
    a, b = on_shards("ann", "bob")
    cluster.send(track(a, product_id="p1"))
    cluster.send(track(b, "Product Added", product_id="p2", price=3.0))
    cluster.append(alias(b, a))  # A into B
    cluster.append(alias(a, b))  # B into A
    cluster.settle()

    [(survivor, profile)] = _all_profiles(cluster).items()
    assert survivor == min(a, b)  # the same whichever order the shards took
    assert (profile.counts["Product Viewed"], profile.counts["Product Added"]) == (1, 1)
    assert cluster.lookup(a) is profile and cluster.lookup(b) is profile
    cluster.send(track(a, product_id="p3"))  # later events reach it, from either id
    cluster.send(track(b, product_id="p4"))
    assert profile.counts["Product Viewed"] == 3
    assert cluster.state() == _replayed(cluster)


def test_a_loop_of_three_merges_ends_in_one_profile() -> None:
    cluster = Cluster()
    a, b, c = on_shards("ann", "bob", "cy")
    for customer in (a, b, c):
        cluster.send(track(customer, product_id=customer))
    cluster.append(alias(b, a))
    cluster.append(alias(c, b))
    cluster.append(alias(a, c))
    cluster.settle()
    [profile] = _all_profiles(cluster).values()
    assert profile.counts["Product Viewed"] == 3
    assert {cluster.lookup(x).id for x in (a, b, c)} == {profile.id}


def test_a_chain_of_renames_is_followed() -> None:
    # Reads gave up after 3 hops and forwards after 4: a customer renamed five times
    # was unknown under the first name, and an erasure through it missed the person.
    cluster = Cluster()
    names = [f"r{n}" for n in range(7)]
    cluster.send(identify(names[0], email="r@example.com"))
    for old, new in itertools.pairwise(names):
        cluster.send(alias(new, old))
    assert cluster.send(track(names[0], product_id="p1")) == FORWARDED
    last = cluster.lookup(names[-1])
    assert last.traits["email"] == "r@example.com" and last.counts["Product Viewed"] == 1
    assert cluster.lookup(names[0]) is last


def _replayed(cluster: Cluster) -> list[dict]:
    """The state every partition reaches again from its checkpoint and stream."""
    for index in range(cluster.shards):
        cluster.crash(index)
    cluster.settle()
    return cluster.state()


def _step(cluster: Cluster, *shards: int) -> None:
    for index in shards:
        cluster.pump(index)
    for index in shards:
        cluster.checkpoint(index)


def _loop_ended_then_merged_on() -> tuple[Cluster, str, str, str]:
    """A loop of merges ended on A, A then merged into D, A's own profile still going round."""
    cluster = Cluster()
    a, b, d = on_shards("ann", "bob", "dan")
    assert a < b
    sa, sb, sd = (cluster.owner(x) for x in (a, b, d))
    cluster.send(track(a, product_id="pa"))
    cluster.send(track(b, product_id="pb"))
    cluster.send(track(d, product_id="pd"))
    cluster.append(alias(b, a))
    cluster.append(alias(a, b))
    for _ in range(4):  # both profiles out; each merge one hop round the loop
        _step(cluster, sa, sb)
    cluster.pump(sa)  # B's profile comes round to A and ends the loop there
    assert a in cluster.parts[sa].profiles
    cluster.append(alias(d, a))  # then A is merged into D
    _step(cluster, sd)
    _step(cluster, sa)
    assert cluster.parts[sa].aliases[a] == d
    cluster.settle()  # A's own profile, still going round, lands on D
    return cluster, a, b, d


def test_a_loop_broken_and_merged_on_elsewhere_is_followed_not_broken_again() -> None:
    # It took A back from D, splitting the person (and erasing D left that copy under A).
    cluster, a, b, d = _loop_ended_then_merged_on()
    [profile] = _all_profiles(cluster).values()  # one person, one profile
    assert profile.id == d and cluster.lookup(a) is profile and cluster.lookup(b) is profile
    cluster.send(erase(d))
    assert _all_profiles(cluster) == {}


def test_a_loop_broken_and_merged_on_elsewhere_keeps_every_event() -> None:
    # Merges were deduplicated by source id: A's own first profile reached D as a
    # merge from A, which D had taken already (the A that ended the loop), and its
    # view was dropped as a duplicate.
    cluster, _, _, _ = _loop_ended_then_merged_on()
    [profile] = _all_profiles(cluster).values()
    assert profile.counts["Product Viewed"] == 3

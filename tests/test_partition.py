"""A shard's state without I/O: merges across partitions, erasure, replay invariants."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.partition import APPLIED, DROPPED, DUPLICATE, FORWARDED, Partition
from engine.routing import shard_for
from tests.factories import normalized, track

SHARDS = 3


class Cluster:
    """Partitions plus a router that delivers their forwards, as the store does."""

    def __init__(self) -> None:
        self.parts = [Partition(lambda c, i=i: shard_for(c, SHARDS) == i) for i in range(SHARDS)]

    def send(self, event: dict) -> str:
        outcome = self.parts[shard_for(event["customer"], SHARDS)].apply(event)
        self.flush()
        return outcome

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for part in self.parts:
                for target, event in part.take_changes().forwards:
                    self.parts[shard_for(target, SHARDS)].apply(event)
                    moved = True

    def lookup(self, customer: str):
        found = self.parts[shard_for(customer, SHARDS)].lookup(customer)
        return self.lookup(found) if isinstance(found, str) else found


def ids_on_different_shards() -> tuple[str, str]:
    user = "user-1"
    anon = next(
        f"anon-{n}" for n in range(100) if shard_for(f"anon-{n}", SHARDS) != shard_for(user, SHARDS)
    )
    return user, anon


def test_identify_merges_anonymous_history_across_partitions() -> None:
    cluster = Cluster()
    user, anon = ids_on_different_shards()
    cluster.send(normalized(track(anon, "Product Viewed", anonymous=True, product_id="p1")))
    cluster.send(
        normalized(track(anon, "Product Added", anonymous=True, product_id="p1", price=2.0))
    )
    identify = normalized(
        {"type": "identify", "userId": user, "anonymousId": anon, "traits": {"plan": "gold"}}
    )
    assert cluster.send(identify) == APPLIED
    profile = cluster.lookup(user)
    assert profile.merged_ids == [anon] and profile.merging == []
    assert profile.counts == {"Product Viewed": 1, "Product Added": 1} and "p1" in profile.cart
    # Later anonymous-only events reach the user's profile.
    assert cluster.send(normalized(track(anon, "Product Viewed", anonymous=True))) == FORWARDED
    assert cluster.lookup(user).counts["Product Viewed"] == 2
    assert cluster.lookup(anon) is profile
    # Asking again (every SDK call after login carries both ids) merges nothing twice.
    cluster.send(normalized({"type": "identify", "userId": user, "anonymousId": anon}))
    assert cluster.lookup(user).counts["Product Viewed"] == 2 and profile.merged_ids == [anon]


def test_alias_merges_previous_id() -> None:
    cluster = Cluster()
    cluster.send(normalized(track("old-id", "Order Completed", revenue=10)))
    cluster.send(normalized({"type": "alias", "userId": "new-id", "previousId": "old-id"}))
    assert cluster.lookup("new-id").revenue == 10.0


def test_duplicate_merge_in_is_ignored() -> None:
    part = Partition(lambda c: True)
    carried = {"type": "_merge_in", "customer": "u", "from": "a", "profile": None, "ts": 1.0}
    assert part.apply(dict(carried)) == APPLIED
    assert part.apply(dict(carried)) == DUPLICATE


def test_erase_removes_profile_aliases_and_later_events() -> None:
    cluster = Cluster()
    user, anon = ids_on_different_shards()
    cluster.send(normalized({"type": "identify", "userId": user, "anonymousId": anon}))
    cluster.send(
        {"type": "_erase", "customer": user, "userId": user, "anonymousId": None, "ts": 5.0}
    )
    assert cluster.lookup(user) is None and cluster.lookup(anon) is None
    assert cluster.send(normalized(track(user))) == DROPPED
    owner = cluster.parts[shard_for(user, SHARDS)]
    assert user not in owner.profiles and user not in str(owner.erased)  # only a digest is kept


def test_take_changes_encodes_exactly_what_changed() -> None:
    part = Partition(lambda c: True)
    part.apply(normalized(track("a")))
    part.apply(normalized(track("b")))
    first = part.take_changes()
    assert set(first.profiles) == {"a", "b"}
    assert orjson.loads(first.profiles["a"])["counts"] == {"Product Viewed": 1}
    part.apply(normalized(track("b")))
    assert set(part.take_changes().profiles) == {"b"}
    assert not part.take_changes()


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["ann", "bob", "cy"]),
        st.sampled_from(["Product Viewed", "Product Added", "Order Completed"]),
    ),
    min_size=1,
    max_size=30,
)


def build(spec: list[tuple[str, str]]) -> list[dict]:
    return [
        normalized(track(c, e, product_id="p", price=1.0), at=1000.0 + n)
        for n, (c, e) in enumerate(spec)
    ]


def state(part: Partition) -> dict:
    return {
        cid: {k: v for k, v in p.to_dict().items() if k != "seen"}
        for cid, p in part.profiles.items()
    }


@settings(max_examples=60, deadline=None)
@given(EVENTS, st.data())
def test_duplicate_deliveries_change_nothing(spec: list, data: st.DataObject) -> None:
    events = build(spec)
    straight = Partition(lambda c: True)
    for event in events:
        straight.apply(event)
    noisy = Partition(lambda c: True)
    for event in events:
        noisy.apply(event)
        for _ in range(data.draw(st.integers(0, 2))):  # SDK retries, page refreshes
            assert noisy.apply(dict(event)) == DUPLICATE
    assert state(noisy) == state(straight)


@settings(max_examples=60, deadline=None)
@given(EVENTS, st.data())
def test_snapshot_and_restore_mid_stream_is_invisible(spec: list, data: st.DataObject) -> None:
    events = build(spec)
    cut = data.draw(st.integers(0, len(events)))
    straight = Partition(lambda c: True)
    for event in events:
        straight.apply(event)
    first = Partition(lambda c: True)
    for event in events[:cut]:
        first.apply(event)
    restored = Partition(lambda c: True)
    restored.restore(first.take_changes().profiles, {}, set())
    for event in events[cut:]:
        restored.apply(event)
    assert {c: p.to_dict() for c, p in restored.profiles.items()} == {
        c: p.to_dict() for c, p in straight.profiles.items()
    }

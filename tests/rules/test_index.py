"""count() by product or category, answered from the journey's index, equals a scan of `recent`."""

from __future__ import annotations

import random

import orjson
import pytest

from engine.profile import Limits, Profile, apply_event, merge_profiles
from engine.rules import merge_journey
from engine.rules.compile import Ctx, Scope, compile_expr
from engine.rules.index import PRODUCT, count, index_key

T0 = 1_700_000_000.0
SMALL = Limits(recent_max=8, recent_window_s=3600.0)  # so entries fall out of `recent` often
EXPRS = [
    compile_expr(text, Scope())
    for text in (
        "count('A', product='p1')",
        "count('A', 10m, product='p2')",
        "count('B', 1h, product=event.product_id)",
        "count(['A', 'B'], 30m, product='p1')",
        "count('A', 1h, category='x')",
        "count(['A', 'B'], category='y')",
        "count('B', 5m, category=event.category)",
    )
]


def naive(expr, p: Profile, now: float, event: dict) -> int:
    args = expr.node.args
    names = args[0].constant
    names = [names] if isinstance(names, str) else names
    window = args[1].constant if len(args) > 1 else None
    lo = now - window if window is not None else -float("inf")
    want = {}
    for key, node in expr.node.kwargs.items():
        want[key] = event.get(node.value) if node.kind == "attr" else node.constant
    if want.get("product", "") is None:
        return 0
    return sum(
        1
        for ts, name, pid, cat in p.recent
        if lo < ts <= now
        and name in names
        and want.get("product", pid) == pid
        and want.get("category", cat) == cat
    )


def event(rng: random.Random, t: float, i: int) -> dict:
    props = {"product_id": rng.choice(["p1", "p2", "p3", None]), "category": rng.choice("xy")}
    if rng.random() < 0.1:
        props["category"] = 7  # not a string: `recent` keeps None
    return {
        "type": "track",
        "event": rng.choice("AB"),
        "ts": t,
        "messageId": f"m{i}",
        "properties": {k: v for k, v in props.items() if v is not None},
    }


@pytest.mark.parametrize("skip", [0.3, 0.85])
@pytest.mark.parametrize("seed", range(40))
def test_index_counts_equal_a_scan_through_late_events_ties_merges_and_restores(
    seed: int, skip: float
) -> None:
    rng = random.Random(seed)
    p = Profile("bob")
    t = T0
    for i in range(150):
        step = rng.random()
        if step < 0.08:  # a merge with another identity's history (and its journey)
            other = Profile(f"anon{i}")
            for j in range(rng.randrange(0, 6)):
                apply_event(other, event(rng, t - rng.choice([0, 30, 900, 4000]), j), SMALL)
            if rng.random() < 0.5:  # the other side had an index of its own
                ctx = Ctx(None, other, t, event={"product_id": "p1", "category": "x"})
                for expr in EXPRS:
                    expr.fn(ctx)
            merge_profiles(p, other, SMALL)
            merge_journey(p.journey, other.journey)
            continue
        if step < 0.12:  # a checkpoint and restore
            p = Profile.from_dict(orjson.loads(orjson.dumps(p.to_dict())))
            continue
        t += rng.choice([0, 0, 1, 60, 300, 1200])  # ties are common
        at = t - rng.choice([0, 0, 0, 30, 600, 5000])  # sometimes late
        ev = event(rng, at, i)
        apply_event(p, ev, SMALL)
        if rng.random() < skip:
            continue  # not asked on every event: the index falls behind (and catches up)
        now = t - rng.choice([0, 0, 60, 1800])
        props = ev["properties"]
        ctx = Ctx(None, p, now, event=props)
        for expr in rng.sample(EXPRS, len(EXPRS)):
            assert expr.fn(ctx) == naive(expr, p, now, props), (seed, i, expr.text)
    assert orjson.loads(orjson.dumps(p.journey)) == p.journey


def test_the_index_is_kept_up_to_date_by_one_event_at_a_time() -> None:
    p = Profile("bob")
    for i in range(5):
        apply_event(p, event(random.Random(i), T0 + i, i) | {"event": "A"}, Limits())
        count(p, p.journey, index_key("A", PRODUCT), "A", PRODUCT, "p1", -float("inf"), T0 + 10)
    seen, held, newest, by_product, last = p.journey["ix"]["product:A"]
    assert (seen, held, newest) == (5, 5, T0 + 4) and last is p.recent[-1]
    assert by_product.get("p1", []) == [ts for ts, _, pid, _ in p.recent if pid == "p1"]


def test_events_sharing_one_time_extend_the_index_without_a_rebuild() -> None:
    # A batch sent without timestamps: every event has the same receivedAt.
    p = Profile("tie")
    built = []
    for i in range(8):
        apply_event(p, event(random.Random(i), T0, i) | {"event": "A"}, Limits())
        n = count(p, p.journey, index_key("A", PRODUCT), "A", PRODUCT, "p1", T0 - 1, T0 + 1)
        built.append(p.journey["ix"]["product:A"][1])
        assert n == sum(1 for ts, name, pid, _ in p.recent if name == "A" and pid == "p1")
    assert built == list(range(1, 9))  # one entry more each time: held grew, never rebuilt
    assert p.journey["ix"]["product:A"][4] is p.recent[-1]


def test_the_index_is_not_checkpointed() -> None:
    p = Profile("cache")
    apply_event(p, event(random.Random(1), T0, 1) | {"event": "A"}, Limits())
    count(p, p.journey, index_key("A", PRODUCT), "A", PRODUCT, "p1", T0 - 1, T0 + 1)
    assert "ix" in p.journey and "ix" not in p.to_dict()["journey"]
    assert "ix" not in Profile.from_dict(orjson.loads(orjson.dumps(p.to_dict()))).journey


def test_an_index_asked_now_and_then_catches_up_without_a_rebuild() -> None:
    # "Product Added" counted on views only: several adds arrive between two questions.
    p = Profile("carol")
    key = index_key("A", PRODUCT)
    i = 0
    for rounds in range(6):
        for _ in range(rounds % 3 + 1):
            i += 1
            apply_event(p, {**event(random.Random(i), T0 + i, i), "event": "A"}, Limits())
        i += 1
        apply_event(p, {**event(random.Random(i), T0 + i, i), "event": "B"}, Limits())
        n = count(p, p.journey, key, "A", PRODUCT, "p1", -float("inf"), T0 + i)
        assert n == sum(1 for _, name, pid, _ in p.recent if name == "A" and pid == "p1")
        if rounds == 0:
            index = p.journey["ix"][key]
        assert p.journey["ix"][key] is index  # brought up to date in place, never rebuilt
    assert index[0] == index[1] == p.counts["A"] and index[4] is p.recent[-2]


def test_a_late_event_before_the_last_indexed_one_rebuilds_the_index() -> None:
    p = Profile("dave")
    key = index_key("A", PRODUCT)
    for i in range(3):
        apply_event(p, {**event(random.Random(i), T0 + 10 * i, i), "event": "A"}, Limits())
    count(p, p.journey, key, "A", PRODUCT, "p1", -float("inf"), T0 + 100)
    index = p.journey["ix"][key]
    late = {"type": "track", "event": "A", "ts": T0 + 5, "messageId": "late"}
    apply_event(p, {**late, "properties": {"product_id": "p1"}}, Limits())
    assert count(p, p.journey, key, "A", PRODUCT, "p1", -float("inf"), T0 + 100) == sum(
        1 for _, name, pid, _ in p.recent if name == "A" and pid == "p1"
    )
    assert p.journey["ix"][key] is not index

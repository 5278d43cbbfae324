"""Recommendations from a small hand-made history give the expected items."""

from __future__ import annotations

import math

import pytest

from engine.recs.cooccur import EPOCH, CoCounts, CoSettings, _drain, _nth_steps
from engine.recs.rank import RankSettings, excluded, recommend, seeds_of

DAY = 86400.0
T = EPOCH  # forward decay factor 1 at T
FLAT = CoSettings(half_life_s=1e12, pair_half_life_s=1e12)  # no decay: easy arithmetic


def bought(counts: CoCounts, items: list[str], at: float = T) -> None:
    counts.observe(items, counts.settings.purchase_weight, at, [])


def hand_made() -> CoCounts:
    """Four baskets: socks go with shoes twice and with a hat once; a scarf goes with a hat."""
    counts = CoCounts(FLAT)
    bought(counts, ["shoes", "socks"])
    bought(counts, ["shoes", "socks", "laces"])
    bought(counts, ["socks", "hat"])
    bought(counts, ["hat", "scarf"])
    return counts


def test_counts_and_cosine_by_hand() -> None:
    counts = hand_made()
    # each purchase weighs 5: socks in 3 baskets, shoes in 2, together in 2
    assert counts.mass["socks"] == 15 and counts.mass["shoes"] == 10
    assert counts.pairs[("shoes", "socks")] == 10
    assert counts.adjacency()["socks"]["shoes"] == 10 == counts.adjacency()["shoes"]["socks"]
    assert counts.neighbors("shoes", 5) == [("socks", 10.0), ("laces", 5.0)]
    profile = {"purchased": [[T - 40 * DAY, "shoes"]], "recent": []}
    seeds = seeds_of(profile, T, FLAT, RankSettings(seed_half_life_s=1e12))
    got = recommend(
        seeds,
        {s: counts.neighbors(s, 10) for s in seeds},
        counts.mass,
        [],
        limit=5,
        exclude=set(),
        settings=RankSettings(popularity_blend=0),
    )
    # socks: 10/sqrt(10*15) = 0.816; laces: 5/sqrt(10*5) = 0.707
    assert [g["product_id"] for g in got] == ["socks", "laces"]
    assert got[0]["score"] == pytest.approx(5 * 10 / math.sqrt(150), rel=1e-5)


def test_a_viewer_of_shoes_gets_socks_then_laces_then_popular_fallback() -> None:
    counts = hand_made()
    profile = {"recent": [[T - 60, "Product Viewed", "shoes", "footwear"]], "purchased": []}
    seeds = seeds_of(profile, T, FLAT, RankSettings())
    popular = [(item, w, "popular") for item, w in counts.top_popular("", 10)]
    got = recommend(
        seeds,
        {s: counts.neighbors(s, 10) for s in seeds},
        counts.mass,
        popular,
        limit=4,
        exclude=set(),
        settings=RankSettings(popularity_blend=0),
    )
    assert [(g["product_id"], g["reason"]) for g in got] == [
        ("socks", "also_liked"),
        ("laces", "also_liked"),
        ("hat", "popular"),
        ("shoes", "popular"),
    ]


def test_just_bought_cart_out_of_stock_and_category_limits_are_filtered() -> None:
    counts = hand_made()
    profile = {
        "recent": [[T - 60, "Product Viewed", "hat", None]],
        "purchased": [[T - DAY, "socks"]],  # bought yesterday: not offered again
        "cart": {"laces": {"added_at": T - 30}},
    }
    rank = RankSettings(popularity_blend=0, max_per_category=1)
    seeds = seeds_of(profile, T, FLAT, rank)
    assert set(seeds) == {"hat", "socks", "laces"}
    categories = {"shoes": "footwear", "scarf": "accessories", "hat": "accessories"}
    popular = [(item, w, "popular") for item, w in counts.top_popular("", 10)]
    got = recommend(
        seeds,
        {s: counts.neighbors(s, 10) for s in seeds},
        counts.mass,
        popular,
        limit=5,
        exclude=excluded(profile, T, rank),
        settings=rank,
        category_of=categories.get,
        in_stock=lambda item: item != "scarf",
    )
    ids = [g["product_id"] for g in got]
    assert "socks" not in ids and "laces" not in ids  # just bought, in the cart
    assert "scarf" not in ids  # out of stock
    assert ids == ["shoes", "hat"]  # one per category: shoes (footwear), hat (accessories)


def test_event_weights_and_pair_recency() -> None:
    settings = CoSettings(half_life_s=1e12, pair_half_life_s=DAY)
    counts = CoCounts(settings)
    history = [(T - DAY, "a", settings.view_weight)]  # a viewed a day before b was added
    counts.observe(["b"], settings.add_weight, T, history)
    # min(view 1, add 3) halved once for the one-day gap
    assert counts.pairs[("a", "b")] == pytest.approx(0.5)
    assert counts.mass == {"b": pytest.approx(3.0)}


def test_forward_decay_makes_newer_behaviour_count_more() -> None:
    counts = CoCounts(CoSettings(half_life_s=30 * DAY))
    bought(counts, ["old"], T)
    bought(counts, ["new"], T + 30 * DAY)
    assert counts.mass["new"] == pytest.approx(2 * counts.mass["old"])


def test_shard_partial_counts_merge_to_the_same_as_one_counter() -> None:
    whole, left, right = CoCounts(FLAT), CoCounts(FLAT), CoCounts(FLAT)
    baskets = [["a", "b"], ["b", "c"], ["a", "c", "d"], ["a", "b"]]
    for i, basket in enumerate(baskets):
        bought(whole, basket)
        bought(left if i % 2 else right, basket)
    taken = left.take()
    assert not left and taken.events == 2
    taken.merge(right)
    assert taken.pairs == whole.pairs and taken.mass == whole.mass
    assert taken.popular == whole.popular


def test_the_hot_path_counts_exactly_what_observe_with_history_counts() -> None:
    from types import SimpleNamespace

    from engine.recs.cooccur import history_of

    settings = CoSettings(history_items=3, pair_half_life_s=DAY)
    profile = SimpleNamespace(
        recent=[
            [T - 5 * DAY, "Product Viewed", "a", None],
            [T - 3 * DAY, "Product Added", "b", "x"],
            [T - 2 * DAY, "Page Viewed", None, None],
            [T - DAY, "Product Viewed", "c", None],
            [T - 60, "Product Viewed", "b", "x"],
            [T, "Product Viewed", "z", "cat"],  # the event itself, already in recent
        ],
        purchased=[[T - 4 * DAY, "d"], [T - 3 * DAY, "e"]],
    )
    fast, slow = CoCounts(settings), CoCounts(settings)
    fast.observe_one(profile, "z", settings.view_weight, T, "cat")
    history = history_of(profile, T, settings, ["z"])
    assert [item for _, item, _ in history] == ["b", "c", "a"]
    slow.observe(["z"], settings.view_weight, T, history, {"z": "cat"})
    assert fast.pairs == pytest.approx(slow.pairs)
    assert fast.mass == slow.mass and fast.popular == slow.popular


@pytest.mark.parametrize(
    ("section", "data", "field"),
    [
        ("recs", {"half_life_days": 0}, "recs.half_life_days"),
        ("recs", {"half_life_days": 14}, "recs.half_life_days"),  # overflows before 2100
        ("recs", {"category_limits": ["Socks"]}, "recs.category_limits[0]"),
        ("recs", {"history_items": 0}, "recs.history_items"),
        ("rfm", {"sketch_accuracy": 0.9}, "rfm.sketch_accuracy"),
        ("models", {"active_models": ["../etc/passwd"]}, "models.active_models[0]"),
        ("models", {"score_interval_ms": 0}, "models"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(section: str, data: dict, field: str) -> None:
    from engine.config import from_mapping
    from engine.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        from_mapping({section: data}, {})
    assert caught.value.field == field


def test_category_limits_are_read_from_config() -> None:
    from engine.config import from_mapping
    from engine.recs.settings import rank_settings

    config = from_mapping({"recs": {"category_limits": ["Socks=1", "Big Shoes = 2"]}}, {})
    assert dict(rank_settings(config.recs).category_limits) == {"Socks": 1, "Big Shoes": 2}


def test_blended_popularity_keeps_each_item_s_own_reason() -> None:
    counts = hand_made()
    profile = {"recent": [[T - 60, "Product Viewed", "shoes", None]], "purchased": []}
    seeds = seeds_of(profile, T, FLAT, RankSettings())
    popular = [(item, w, "popular") for item, w in counts.top_popular("", 10)]
    got = recommend(
        seeds,
        {s: counts.neighbors(s, 10) for s in seeds},
        counts.mass,
        popular,
        limit=5,
        exclude=set(),
        settings=RankSettings(popularity_blend=2.0),
    )
    reasons = {g["product_id"]: g["reason"] for g in got}
    assert reasons["socks"] == reasons["laces"] == "also_liked"
    assert reasons["hat"] == "popular"  # ranked by the blend, but nothing pairs it with shoes
    assert got[0]["product_id"] == "socks"  # co-occurring and popular


def test_a_bounded_take_sends_the_heaviest_pairs_and_keeps_the_rest_adding_up() -> None:
    counts = CoCounts(FLAT)
    bought(counts, ["shoes", "socks"])  # 5
    counts.observe(["hat", "scarf"], 1.0, T, [])  # 1
    counts.observe(["bag", "belt"], 3.0, T, [])  # 3
    taken = counts.take(max_pairs=2)
    assert taken.pairs == {("shoes", "socks"): 5.0, ("bag", "belt"): 3.0}
    assert set(taken.mass) == {"shoes", "socks", "hat", "scarf", "bag", "belt"}  # mass goes whole
    assert counts.pairs == {("hat", "scarf"): 1.0} and not counts.mass
    counts.observe(["hat", "scarf"], 1.0, T, [])
    assert counts.take(max_pairs=2).pairs == {("hat", "scarf"): 2.0}  # waited and added up
    assert counts.pairs == {}


def test_a_full_carry_drops_the_lightest_pairs_and_counts_them() -> None:
    counts = CoCounts(FLAT)
    for n, weight in enumerate([5.0, 4.0, 3.0, 2.0, 1.0]):
        counts.observe([f"a{n}", f"b{n}"], weight, T, [])
    taken = counts.take(max_pairs=1, carry=2)
    assert list(taken.pairs.values()) == [5.0]
    assert sorted(counts.pairs.values()) == [3.0, 4.0]
    assert counts.dropped == 2
    merged = CoCounts(FLAT)
    merged.merge(counts)
    assert merged.dropped == 2  # a failed flush handed back keeps the tally


@pytest.mark.parametrize("seed", range(30))
def test_a_full_carry_keeps_exactly_the_heaviest_ties_by_the_greater_pair(seed: int) -> None:
    import random

    rng = random.Random(seed)
    items = [f"p{i:02d}" for i in range(25)]
    weights = [1.0, 2.0, 3.0, rng.random(), rng.random()]  # many ties
    pairs = {}
    for _ in range(rng.randint(1, 250)):
        a, b = sorted(rng.sample(items, 2))
        pairs[(a, b)] = rng.choice(weights)
    counts = CoCounts(FLAT)
    counts.pairs = dict(pairs)
    max_pairs, carry = rng.randint(1, 20), rng.randint(0, 150)
    taken = counts.take(max_pairs=max_pairs, carry=carry)
    ranked = [
        (a, b) for w, a, b in sorted(((w, a, b) for (a, b), w in pairs.items()), reverse=True)
    ]
    if len(ranked) <= max_pairs:
        assert set(taken.pairs) == set(ranked) and counts.pairs == {}
        return
    assert set(taken.pairs) == set(ranked[:max_pairs])
    kept = ranked[max_pairs : max_pairs + carry]
    assert counts.pairs == {key: pairs[key] for key in kept}
    assert counts.dropped == len(ranked) - max_pairs - len(kept)


@pytest.mark.parametrize("seed", range(20))
def test_a_take_in_steps_equals_one_take_and_keeps_what_is_counted_meanwhile(seed: int) -> None:
    import random

    from engine.recs.cooccur import _drain

    rng = random.Random(seed)
    items = [f"p{i:02d}" for i in range(40)]
    pairs = {}
    for _ in range(rng.randint(1, 400)):
        a, b = sorted(rng.sample(items, 2))
        pairs[(a, b)] = rng.choice([1.0, 2.0, rng.random()])
    max_pairs, carry = rng.randint(1, 30), rng.randint(0, 300)
    whole, stepped = CoCounts(FLAT), CoCounts(FLAT)
    whole.pairs, stepped.pairs = dict(pairs), dict(pairs)
    expected = whole.take(max_pairs=max_pairs, carry=carry)
    steps = stepped.take_steps(max_pairs, carry, step=7)
    pieces, meanwhile = 0, CoCounts(FLAT)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            taken = done.value
            break
        pieces += 1
        a, b = sorted(rng.sample(items, 2))  # counted between two pieces
        stepped.observe([a, b], 1.0, T, [])
        meanwhile.observe([a, b], 1.0, T, [])
    assert taken.pairs == expected.pairs
    assert stepped.dropped == whole.dropped
    # What was carried plus what came meanwhile: nothing lost, nothing in twice.
    whole.merge(meanwhile)
    assert stepped.pairs == pytest.approx(whole.pairs)
    assert stepped.mass == pytest.approx(meanwhile.mass)
    assert len(pairs) <= max_pairs or len(pairs) < 7 or pieces > 0  # it did go in pieces
    assert _drain(CoCounts(FLAT).take_steps(1, 1)).pairs == {}


class _FlatCounts:
    """The plain reference: every pair in one dict keyed by (a, b), a < b."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], float] = {}

    def add(self, a: str, b: str, w: float) -> None:
        key = (a, b) if a < b else (b, a)
        self.pairs[key] = self.pairs.get(key, 0.0) + w


@pytest.mark.parametrize("seed", range(25))
def test_pairs_held_per_item_equal_one_flat_table_through_takes_and_merges(seed: int) -> None:
    import random
    from types import SimpleNamespace

    from engine.recs.cooccur import history_of

    rng = random.Random(seed)
    settings = CoSettings(history_items=3, pair_half_life_s=DAY)
    counts, flat = CoCounts(settings), _FlatCounts()
    items = [f"p{i}" for i in range(12)]
    profile = SimpleNamespace(recent=[], purchased=[])
    t = T
    for _ in range(300):
        t += rng.choice([1.0, 60.0, 3600.0])
        step = rng.random()
        if step < 0.6:  # a view or an add, on the hot path, checked against history_of
            item = rng.choice(items)
            name = rng.choice(["Product Viewed", "Product Added"])
            weight = settings.view_weight if name == "Product Viewed" else settings.add_weight
            history = history_of(profile, t, settings, [item])
            counts.observe_one(profile, item, weight, t, None)
            scale = settings.scale(t)
            for then, other, w in history:
                flat.add(item, other, min(weight, w) * scale * math.exp2((then - t) / DAY))
            profile.recent.append([t, name, item, None])
        elif step < 0.8:  # an order of a few lines
            lines = rng.sample(items, rng.randint(1, 3))
            history = history_of(profile, t, settings, lines)
            counts.observe(lines, settings.purchase_weight, t, history)
            scale = settings.scale(t)
            w = settings.purchase_weight * scale
            for i, item in enumerate(lines):
                for other in lines[:i]:
                    flat.add(item, other, w)
                for then, other, ow in history:
                    if other != item:
                        pw = min(settings.purchase_weight, ow) * scale
                        flat.add(item, other, pw * math.exp2((then - t) / DAY))
            profile.purchased.extend([t, item] for item in lines)
        elif step < 0.9:  # a bounded flush: the heaviest go, ties by the greater pair
            limit = rng.randint(1, 6)
            taken = counts.take(max_pairs=limit)
            expected = sorted(((w, a, b) for (a, b), w in flat.pairs.items()), reverse=True)
            if len(expected) > limit:
                gone = {(a, b) for _, a, b in expected[:limit]}
                assert set(taken.pairs) == gone
                flat.pairs = {k: w for k, w in flat.pairs.items() if k not in gone}
            else:
                assert set(taken.pairs) == set(expected and [(a, b) for _, a, b in expected])
                flat.pairs = {}
        else:  # a failed flush handed back: merged into what was counted meanwhile
            handed = counts.take()
            counts.merge(handed)
        assert counts.pairs == pytest.approx(flat.pairs, rel=1e-12)
        assert counts.pair_count() == len(flat.pairs)
    adjacency = counts.adjacency()
    for (a, b), w in counts.pairs.items():
        assert adjacency[a][b] == adjacency[b][a] == w


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("n", [1, 7, 300, 5000])
def test_the_heaviest_pairs_are_what_nlargest_picks_ties_included(seed: int, n: int) -> None:
    import heapq
    import random

    rng = random.Random(seed)
    counts = CoCounts(FLAT)
    # few distinct weights, so ties straddle the cut; skewed, as real weights are
    weights = [rng.choice([0.5, 1.0, 3.0]) * rng.choice([1, 1, 1, 2, 40]) for _ in range(50)]
    items = [f"p{i:03d}" for i in range(150)]
    flat = {}
    for _ in range(8000):
        a, b = sorted(rng.sample(items, 2))
        flat[(a, b)] = rng.choice(weights)
    counts.pairs = flat
    expected = heapq.nlargest(n, ((w, a, b) for (a, b), w in flat.items()))
    assert _drain(counts._extreme_steps(n, heaviest=True)) == expected


def test_the_nth_largest_weight_whatever_the_sample_suggests() -> None:
    def _nth_largest(values: list[float], n: int) -> float | None:
        return _drain(_nth_steps(values, n, largest=True))

    assert _nth_largest([], 3) is None
    assert _nth_largest([2.0, 1.0], 3) == 1.0
    # the sample (every 24th value here) sees only heavy ones: its bound is too high,
    # fewer than n values reach it, and ranking falls back to every value
    values = [9.0 if i % 24 == 0 else 1.0 for i in range(100_000)]
    assert _nth_largest(values, 10) == 9.0
    assert _nth_largest(values, 5000) == 1.0
    # and the sample sees none of the heavy ones
    values = [9.0 if i % 24 == 1 else 1.0 for i in range(100_000)]
    assert _nth_largest(values, 4000) == 9.0 and _nth_largest(values, 4200) == 1.0
    assert _nth_largest(list(range(100_000)), 2500) == 97_500


def test_forward_decay_stays_finite_until_2100_at_the_shortest_half_life() -> None:
    from engine.config import from_mapping
    from engine.recs.cooccur import HORIZON
    from engine.recs.settings import co_settings

    config = from_mapping({"recs": {"half_life_days": 31}}, {}).recs
    settings = co_settings(config)
    counts = CoCounts(settings)
    for _ in range(1000):  # a busy product, every contribution at the horizon
        counts.observe(["a", "b"], settings.purchase_weight, HORIZON, [])
    assert math.isfinite(counts.mass["a"]) and math.isfinite(counts.pairs[("a", "b")])
    # and ranking divides by both masses' roots: their product is far past a float
    got = recommend(
        {"a": 1.0}, {"a": counts.neighbors("a", 5)}, dict(counts.mass), [], limit=1,
        exclude=set(), settings=RankSettings(),
    )  # fmt: skip
    assert [item["product_id"] for item in got] == ["b"] and got[0]["score"] > 0


def test_a_view_stamped_in_the_future_counts_as_of_its_arrival() -> None:
    # Forward decay weighs by time: one view a client's clock put in 2099 (the API
    # takes timestamps up to 2100) outweighed 2,000 real ones for decades.
    from engine.events import normalize
    from engine.insight.live import LiveInsight
    from engine.partition import Partition

    now = EPOCH + 5 * 365 * DAY
    partition = Partition(lambda c: True, insight=LiveInsight(co=CoSettings()))
    for n in range(200):
        view = {"type": "track", "event": "Product Viewed", "userId": f"c{n}",
                "messageId": f"m{n}", "properties": {"product_id": "real"}}  # fmt: skip
        partition.apply(normalize(view, kind=None, received_at=now + n))
    skewed = {"type": "track", "event": "Product Viewed", "userId": "skew", "messageId": "s",
              "timestamp": "2099-01-01T00:00:00Z",
              "properties": {"product_id": "skewed"}}  # fmt: skip
    partition.apply(normalize(skewed, kind=None, received_at=now + 200))
    popular = partition.insight.counts.popular[""]
    assert popular["skewed"] == pytest.approx(popular["real"] / 200, rel=0.01)
    assert partition.lookup("skew").recent[-1][0] > now + 70 * 365 * DAY  # its own time is kept


def test_the_lines_of_a_huge_order_pair_only_among_the_first_few() -> None:
    # Pairs grew with the square of an order's lines: 1,400 lines (a 30 KB event)
    # made a million pairs and held the shard for a quarter of a second.
    from engine.recs.cooccur import BASKET_ITEMS

    counts = CoCounts(FLAT)
    lines = [f"p{n:04d}" for n in range(1400)]
    bought(counts, lines)
    assert counts.pair_count() == BASKET_ITEMS * (BASKET_ITEMS - 1) // 2
    assert len(counts.mass) == 1400  # every line still counts for itself
    assert counts.pairs[("p0000", "p0001")] == 5

"""The condition language: parsing, compilation, null-safe semantics, no eval."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from engine.profile import Profile
from engine.rules.compile import Ctx, Scope, compile_expr
from engine.rules.expr import ExprError, parse

NOW = 1_000_000.0


def profile() -> Profile:
    p = Profile("bob")
    p.revenue = 120.0
    p.orders = 2
    p.traits = {"first_name": "Bob", "tier": "gold", "score": 7}
    p.cart = {
        "p1": {"product_id": "p1", "price": 10, "quantity": 3},
        "42": {"product_id": "42", "price": 5},
    }
    p.counts = {"Product Viewed": 9}
    p.recent = [
        [NOW - 10 * 86400, "Product Viewed", "p1", "Shoes"],
        [NOW - 3 * 86400, "Product Viewed", "p1", "Shoes"],
        [NOW - 3600, "Product Viewed", "p2", "Hats"],
        [NOW - 1200, "Product Viewed", "p1", "Shoes"],
        [NOW - 600, "Product Viewed", "p1", "Shoes"],
        [NOW, "Product Added", "p3", "Shoes"],
        [NOW + 60, "Product Viewed", "p1", "Shoes"],  # after the logical time: never counted
    ]
    p.purchased = [[NOW - 40 * 86400, "p9"], [NOW - 5 * 86400, "p8"]]
    p.last_order_at = NOW - 5 * 86400
    return p


def value(text: str, *, event: dict | None = None, scope: Scope | None = None, **ctx):
    expr = compile_expr(text, scope or Scope(instance=True))
    return expr.fn(Ctx(None, profile(), NOW, event=event or {}, **ctx))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("revenue >= 100 and orders == 2", True),
        ("revenue > 100 and not (orders > 2)", True),
        ("revenue < 100 or traits.tier == 'gold'", True),
        ("traits.tier in ['gold', 'platinum']", True),
        ("traits.tier not in ['gold']", False),
        ("traits.missing == null", True),
        ("traits.missing.deeper == null", True),
        ("traits.missing > 3", False),  # ordering with null is false
        ("traits.tier > 3", False),  # ordering across types is false, not an error
        ("traits.score * 2 + 1", 15),
        ("traits.missing + 1", None),
        ("10 / 0", None),
        ("'Hi ' + traits.first_name", "Hi Bob"),
        ("len(cart)", 2),
        ("len(traits.missing)", 0),
        ("'p1' in cart", True),
        ("42 in cart", True),  # ids match whether they arrive as numbers or strings
        ("cart_total()", 35.0),
        ("15m", 900.0),
        ("1d12h", 129600.0),
        ("count('Product Viewed')", 9),  # all time, from the profile's counters
        ("count('Product Viewed', 7d)", 4),
        ("count('Product Viewed', 7d, product='p1')", 3),
        ("count('Product Viewed', 7d, category='Hats')", 1),
        ("count(['Product Viewed', 'Product Added'], 1h)", 3),
        ("count('Product Viewed', since=now - 30m)", 2),
        ("purchased('p8', 30d)", True),
        ("purchased('p9', 30d)", False),
        ("purchased(['p7', 'p9'])", True),
        ("purchased(null, 30d)", False),
        ("days_since(last_order_at)", 5.0),
        ("hours_since(last('Product Viewed'))", 600 / 3600),
        ("last('Product Viewed').category", "Shoes"),
        ("last('Order Completed')", None),
        ("days_since(traits.missing)", None),
        (
            "session_dwell(category='Shoes')",
            1200.0,
        ),  # views at -20m and -10m, each until the next event
        ("session_dwell(category='Shoes', gap=5m)", 0.0),
        ("product_ids(event)", ["a", "b", "7"]),
        ("key in product_ids(event)", True),
        ("coalesce(traits.missing, traits.first_name)", "Bob"),
        ("max(1, traits.score, null)", 7),
        ("round(2.456, 1)", 2.5),
        ("lower(traits.first_name)", "bob"),
        ("event.products[0].product_id", "a"),
        ("event['products'][5]", None),
        ("-traits.score", -7),
        ("true and 1 == 1.0", True),
    ],
)
def test_values(text: str, expected: object) -> None:
    event = {"products": [{"product_id": "a"}, {"sku": "b"}], "product_id": 7}
    assert value(text, event=event, key="7") == expected


@pytest.mark.parametrize(
    ("text", "message", "offset"),
    [
        ("revenue >", "expected a value", 9),
        ("revenue = 3", "use '==' to compare", 8),
        ("1 < revenue < 5", "cannot be chained", 12),
        ("revnue > 3", "did you mean 'revenue'", 0),
        ("__import__('os')", "unknown function __import__()", 0),
        ("revenue.__class__", None, None),  # field access on data never reaches Python attributes
        ("count()", "count() needs 1 argument", 0),
        ("count(traits.x, 7d)", "must be an event name in quotes", 0),
        ("count('A', 7d, prodcut='x')", "has no argument 'prodcut'", 15),
        ("count('A', '7 days')", "not a duration", 0),
        ("segment('gold')", "unknown segment 'gold'", 8),
        ("len", "is a function", 0),
        ("'unterminated", "matching quotes", 0),
        ("revenue @ 3", "unexpected character '@'", 8),
        ("(revenue > 3", "expected ')'", 12),
        ("", "empty expression", 0),
    ],
)
def test_errors(text: str, message: str | None, offset: int | None) -> None:
    if message is None:
        assert value(text) is None
        return
    with pytest.raises(ExprError) as caught:
        compile_expr(text, Scope())
    assert message in caught.value.message
    assert caught.value.offset == offset


@pytest.mark.parametrize(
    ("text", "scope", "message"),
    [
        ("event.price > 3", Scope(event=False, event_only=False), "'event' is not available"),
        ("key == 'x'", Scope(), "only available once a rule has been entered"),
        (
            "event_name == 'x'",
            Scope(event_only=False, instance=True),
            "'event_name' is only available",
        ),
    ],
)
def test_scope(text: str, scope: Scope, message: str) -> None:
    with pytest.raises(ExprError, match=message):
        compile_expr(text, scope)


def test_constants_fold_and_refs_are_collected() -> None:
    folded = compile_expr("1h > 30m and 'a' in ['a', 'b']", Scope())
    assert folded.const and folded.value is True
    expr = compile_expr(
        "event.price > 3 and last('Product Viewed').name != null and trigger.x",
        Scope(instance=True),
    )
    assert expr.refs.event_props == {"price"}
    assert not expr.refs.event_whole
    assert expr.refs.trigger_props == {"x"}
    assert expr.refs.last == {"Product Viewed": {"name"}}
    whole = compile_expr("product_ids(event)", Scope())
    assert whole.refs.event_whole


def test_parse_keeps_source_spans() -> None:
    node = parse("count('A', 7d) >= 3 and not (x in cart)")
    assert [child.text for child in node.args] == ["count('A', 7d) >= 3", "not (x in cart)"]


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(ExprError, match="nests too deeply"):
        parse("(" * 100 + "1" + ")" * 100)


_VALUES = [None, True, 0, 1, 2.5, 42, "42", "a", "b", "", [1], {"k": 1}]
_CONSTANTS = ["'a'", "'42'", "1", "2.5", "0", "['a', '42']", "['x']"]


@pytest.mark.parametrize("op", ["==", "<", "<=", ">", ">=", "in", "not in"])
@pytest.mark.parametrize("constant", _CONSTANTS)
@pytest.mark.parametrize("field", ["event.x", "traits.x", "revenue"])
def test_fast_paths_agree_with_the_generic_comparison(op: str, constant: str, field: str) -> None:
    """`field OP constant` has specialised closures; they must match the general rules."""
    from engine.rules.compile import _COMPARE

    fast = compile_expr(f"{field} {op} {constant}", Scope())
    const = compile_expr(constant, Scope()).value
    for v in _VALUES:
        p = profile()
        p.traits["x"] = v
        p.revenue = v
        ctx = Ctx(None, p, NOW, event={"x": v})
        assert fast.fn(ctx) == _COMPARE[op](v, const), (field, op, constant, v)


def test_counts_agree_with_a_naive_count_however_often_they_are_asked() -> None:
    """The projection used from the second count of an event must give the same answers."""
    import random

    from engine.rules.compile import Ctx

    rng = random.Random(5)
    exprs = [
        compile_expr(text, Scope())
        for text in (
            "count('A', 1h)",
            "count('A', 1h, category='x')",
            "count(['A', 'B'], 1h, category='x')",
            "count('B', 1h, product='p1')",
            "count('A', 1h, product='p1', category='y')",
            "count('A', 1d)",
            "count(['A', 'B'], 30m)",
            "count('A', 1h, category='y')",
        )
    ]
    for _ in range(200):
        p = profile()
        t = NOW - 7200
        p.recent = []
        for _ in range(rng.randrange(0, 40)):
            t += rng.choice([0, 1, 60, 600])
            p.recent.append(
                [t, rng.choice("AB"), rng.choice(["p1", "p2", None]), rng.choice(["x", "y", None])]
            )
        now = NOW - rng.choice([0, 900, 3600])
        ctx = Ctx(None, p, now)
        for expr in rng.sample(exprs, len(exprs)) * 2:
            names = expr.node.args[0].constant
            names = [names] if isinstance(names, str) else names
            window = expr.node.args[1].constant
            want = {k: v.constant for k, v in expr.node.kwargs.items()}
            naive = sum(
                1
                for ts, name, pid, cat in p.recent
                if now - window < ts <= now
                and name in names
                and want.get("product", pid) == pid
                and want.get("category", cat) == cat
            )
            assert expr.fn(ctx) == naive, expr.text


@given(
    times=st.lists(st.integers(-100, 100), max_size=50),
    products=st.lists(st.sampled_from("abcde"), min_size=50, max_size=50),
    wanted=st.lists(st.sampled_from("abcdef"), min_size=1, max_size=3),
    window=st.one_of(st.none(), st.integers(0, 150)),
)
@example(times=[-10, 0], products=["a"] * 50, wanted=["a"], window=10)  # both window edges
@example(times=[-10], products=["a"] * 50, wanted=["a"], window=10)  # at lo: outside
def test_purchased_matches_a_scan_of_the_purchases(
    times: list[int], products: list[str], wanted: list[str], window: int | None
) -> None:
    # purchased() bisects the time-ordered list; a plain scan says what it must answer
    p = profile()
    p.purchased = [[NOW + t, pid] for t, pid in zip(sorted(times), products, strict=False)]
    lo = -float("inf") if window is None else NOW - window
    expected = any(lo < ts <= NOW and pid in wanted for ts, pid in p.purchased)
    args = repr(wanted) if window is None else f"{wanted!r}, {window}s"
    expr = compile_expr(f"purchased({args})", Scope(instance=True))
    assert expr.fn(Ctx(None, p, NOW, event={})) is expected

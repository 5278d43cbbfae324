"""Templates: sandboxed, autoescaped, declared fallbacks, HTML + text, CSS inlined."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.content.blocks import Links
from engine.delivery.context import build_context
from engine.delivery.templates import TemplateError, TemplateSet, apply_defaults
from engine.rules import RuleSet
from engine.rules.files import STARTER
from engine.tracking import TokenSigner

SIGNER = TokenSigner("secret", "https://t.example")
SHOP = {"name": "Socks & Co", "url": "https://shop.example"}


def context(profile: dict | None, payload: dict | None = None, **send: object) -> dict:
    base = {
        "send_id": "s1",
        "customer": "ann",
        "rule": "r",
        "variant": "classic",
        "payload": payload or {},
        **send,
    }
    return build_context(base, profile, signer=SIGNER, links=Links(), shop=SHOP)


ANN = {
    "id": "ann",
    "traits": {"first_name": "Ann", "email": "ann@example.com"},
    "cart": {
        "sku-1": {
            "product_id": "sku-1",
            "name": "Wool <socks>",
            "price": 9.5,
            "quantity": 2,
            "url": "https://shop.example/p/1",
            "added_at": 1,
        }
    },
    "cart_total": 19.0,
    "recent": [[5.0, "Product Viewed", "p2", "Shoes"]],
    "purchased": [[4.0, "p9"]],
}


def starter_templates() -> set[str]:
    rules = RuleSet.from_sources([(STARTER.read_text(), "starter.toml")]).rules
    names = set()
    for rule in rules:
        arms = [v for v, _ in rule.variants] or [None]
        for step in rule.steps:
            for arm in arms:
                names.add(step.template.replace("{variant}", arm) if arm else step.template)
    return names


def test_every_starter_rule_template_is_shipped() -> None:
    assert starter_templates() <= set(TemplateSet().names())


@pytest.mark.parametrize("name", TemplateSet().names())
@pytest.mark.parametrize("profile", [None, {"id": "x"}, ANN], ids=["unknown", "empty", "ann"])
def test_shipped_templates_render_for_any_profile(name: str, profile: dict | None) -> None:
    rendered = TemplateSet().render(name, context(profile))
    assert rendered.subject and "None" not in rendered.subject
    assert "None" not in rendered.text and ">None<" not in rendered.html
    assert SIGNER.unsubscribe_url("s1", "ann", rule="r", variant="classic") in rendered.html
    assert "/t/o/" in rendered.html and "Unsubscribe" in rendered.text
    assert "<style" not in rendered.html and 'style="' in rendered.html  # inlined


def test_values_are_escaped_in_html_not_in_text() -> None:
    rendered = TemplateSet().render("cart-reminder-classic", context(ANN))
    assert "Wool &lt;socks&gt;" in rendered.html and "<socks>" not in rendered.html
    assert "Wool <socks> x 2" in rendered.text
    assert "19.00" in rendered.html and "Ann, you left" in rendered.subject


def test_fallbacks_fill_missing_and_none_values() -> None:
    rendered = TemplateSet().render("we-miss-you", context({"id": "x"}))
    assert rendered.subject == "We miss you, there"
    assert "It has been a while." in rendered.text
    back = TemplateSet().render("we-miss-you", context({"id": "x"}, {"days_away": 34}))
    assert "It has been 34 days." in back.text and "been 34 days" in back.html
    followup = TemplateSet().render("cart-followup", context(ANN, {"coupon": "SAVE5"}))
    assert "SAVE5" in followup.subject and "SAVE5" in followup.html


def test_conditional_blocks_follow_the_profile() -> None:
    no_purchase = {**ANN, "purchased": []}
    with_purchase = TemplateSet().render("cross-sell", context(ANN))
    without = TemplateSet().render("cross-sell", context(no_purchase))
    assert "Goes well with your order" in with_purchase.html
    assert "Goes well with your order" not in without.html
    empty_cart = TemplateSet().render("cart-reminder-classic", context({"id": "x"}))
    assert "In your cart" not in empty_cart.html


def test_the_cart_of_the_payload_is_shown_when_the_live_cart_emptied() -> None:
    payload = {"items": {"p": {"product_id": "p", "name": "Hat", "price": 3}}}
    rendered = TemplateSet().render("cart-reminder-urgency", context({"id": "x"}, payload))
    assert "Hat" in rendered.html and "3.00" in rendered.html


def write_set(tmp_path: Path, html: str, defaults: str = "") -> TemplateSet:
    (tmp_path / "templates.toml").write_text(
        f'[defaults]\n{defaults}\n[template.t]\nsubject = "Hi"\nhtml = "t.html"\ntext = "t.txt"\n'
    )
    (tmp_path / "t.html").write_text(html)
    (tmp_path / "t.txt").write_text("text")
    return TemplateSet(tmp_path)


def test_a_value_without_a_declared_default_is_an_error_not_an_empty_string(
    tmp_path: Path,
) -> None:
    templates = write_set(tmp_path, "<p>{{ customer.nickname }}</p>")
    with pytest.raises(TemplateError, match="nickname"):
        templates.render("t", context(ANN))
    templates = write_set(tmp_path, "<p>{{ customer.last_name }}</p>")
    with pytest.raises(TemplateError, match="None"):
        templates.render("t", context(ANN))  # last_name is None: no default declared
    declared = write_set(
        tmp_path, "<p>{{ customer.last_name }}</p>", '"customer.last_name" = "friend"'
    )
    assert "<p>friend</p>" in declared.render("t", context(ANN)).html


def test_the_sandbox_refuses_python_internals(tmp_path: Path) -> None:
    templates = write_set(tmp_path, "{{ customer.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        templates.render("t", context(ANN))
    templates = write_set(tmp_path, "{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(TemplateError):
        templates.render("t", context(ANN))


def test_track_signs_http_links_only(tmp_path: Path) -> None:
    templates = write_set(tmp_path, '<a href="{{ url|track }}">x</a>{{ bad|track }}')
    html = templates.render(
        "t", context(ANN, {"url": "https://a.example/?q=1&r=2", "bad": "javascript:alert(1)"})
    ).html
    token = html.split("/t/c/")[1].split('"')[0]
    assert SIGNER.verify(token, "c").url == "https://a.example/?q=1&r=2"
    assert "javascript" not in html


def test_unknown_template_and_missing_manifest(tmp_path: Path) -> None:
    from engine.errors import ConfigError

    with pytest.raises(TemplateError, match="no template 'nope'"):
        TemplateSet().render("nope", context(ANN))
    with pytest.raises(ConfigError, match=r"templates\.toml"):
        TemplateSet(tmp_path)


def test_apply_defaults_reaches_into_lists_and_leaves_the_input_alone() -> None:
    original = {"a": {"items": [{"n": None}, {"n": "x"}]}, "b": None}
    filled = apply_defaults(original, (("a.items[].n", "d"), ("b", 1), ("c.d", 2)))
    assert filled == {"a": {"items": [{"n": "d"}, {"n": "x"}]}, "b": 1, "c": {"d": 2}}
    assert original["a"]["items"][0]["n"] is None


def test_recommended_products_fill_the_block_and_render() -> None:
    send = {"send_id": "s1", "customer": "ann", "rule": "r", "variant": None, "payload": {}}
    picks = [
        {"product_id": "p7", "name": "Merino <hat>", "price": 25.0, "url": "https://s/p7"},
        {"product_id": "p8", "name": "Scarf", "price": 19.0},
    ]
    links = Links(product_url="https://shop.example/p/{product_id}")
    ctx = build_context(send, ANN, signer=SIGNER, links=links, shop=SHOP, recommended=picks)
    assert [(r["product_id"], r["name"], r["url"]) for r in ctx["recommendations"]] == [
        ("p7", "Merino <hat>", "https://s/p7"),
        ("p8", "Scarf", "https://shop.example/p/p8"),
    ]
    assert ctx["recommendations"][0]["image_url"] is None
    # Without the recommender's picks, the customer's own recent interest is used.
    fallback = build_context(send, ANN, signer=SIGNER, links=links, shop=SHOP)
    assert all(r["product_id"] not in ("p7", "p8") for r in fallback["recommendations"])
    email = TemplateSet("").render("cross-sell", ctx)
    assert "Merino &lt;hat&gt;" in email.html and "Merino <hat>" in email.text

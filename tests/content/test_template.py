"""Templates: every value escaped for where it goes; templates cannot run code."""

from __future__ import annotations

import pytest

from engine.content.template import (
    Markup,
    Template,
    TemplateError,
    body_fields,
    compile_body,
    header_value,
    html_value,
    render_body,
    safe_url,
    url_value,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ('" onmouseover="x', "&quot; onmouseover=&quot;x"),
        ("Ann & Bo's", "Ann &amp; Bo&#x27;s"),
        (None, ""),
        (3.0, "3"),
        (True, "true"),
        (Markup("<b>made here</b>"), "<b>made here</b>"),
    ],
)
def test_html_values_are_escaped(value: object, expected: str) -> None:
    assert Template("{v}").render({"v": value}, html_value) == expected


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://shop.example/p/1", True),
        ("http://shop.example/p/1", True),
        ("mailto:help@shop.example", True),
        ("/p/1", True),
        ("javascript:alert(1)", False),
        (" JavaScript:alert(1)", False),
        ("data:text/html,<b>x</b>", False),
        ("//evil.example/x", False),
        (42, False),
    ],
)
def test_url_filter_keeps_only_safe_schemes(url: object, kept: bool) -> None:
    out = Template('<a href="{u|url}">x</a>').render({"u": url}, html_value)
    assert (out != '<a href="">x</a>') is kept
    assert safe_url(url) == (url.strip() if kept else "")


def test_url_values_are_percent_encoded() -> None:
    template = Template("https://api.example/x?c={id}&e={traits.email}")
    out = template.render({"id": "a b/c?d&e=#", "traits": {"email": "a+b@x.io"}}, url_value)
    assert out == "https://api.example/x?c=a%20b%2Fc%3Fd%26e%3D%23&e=a%2Bb%40x.io"


def test_dot_segments_are_encoded_in_urls() -> None:
    # "..": servers and proxies resolve it, so the source got another resource
    template = Template("https://api.example/c/{id}/x")
    assert template.render({"id": ".."}, url_value) == "https://api.example/c/%2E%2E/x"
    assert template.render({"id": "."}, url_value) == "https://api.example/c/%2E/x"
    assert template.render({"id": "a.b"}, url_value) == "https://api.example/c/a.b/x"


def test_missing_values_are_empty_and_paths_reach_into_lists() -> None:
    context = {"items": [{"name": "first"}], "n": 2.5}
    out = Template("{items.0.name}|{items.5.name}|{nope.x}|{n|money}").render(context, html_value)
    assert out == "first|||2.50"


def test_literal_braces_and_the_fields_a_template_names() -> None:
    template = Template("{{x}} {a.b} {c|url}")
    assert template.render({"a": {"b": 1}, "c": "/p"}, html_value) == "{x} 1 /p"
    assert template.fields == {"a.b", "c"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{fixed}}", "{fixed}"),  # no hole
        ("", ""),
        ("{name}", "&lt;b&gt; &amp; &#x27;"),  # one hole, alone
        ("<p>{{{name}}}</p>", "<p>{&lt;b&gt; &amp; &#x27;}</p>"),  # one hole, braces around
        ("{{{link|url}}}", "{https://x.example/?a=1&amp;b=&quot;2&quot;}"),
        ("{n|money}{{", "2.50{"),
        ("{name}{n}", "&lt;b&gt; &amp; &#x27;2.5"),  # two holes
    ],
)
def test_templates_with_no_one_or_several_holes(text: str, expected: str) -> None:
    context = {"name": "<b> & '", "n": 2.5, "link": 'https://x.example/?a=1&b="2"'}
    assert Template(text).render(context, html_value) == expected


@pytest.mark.parametrize("text", ["{", "}", "a { b", "{0}", "{a|shout}", "{a b}", "{}", "{a[0]}"])
def test_bad_templates_are_refused(text: str) -> None:
    with pytest.raises(TemplateError):
        Template(text)


def test_format_style_attribute_access_is_not_evaluated() -> None:
    class Secret:
        token = "s3cret"

    assert Template("{obj.token}").render({"obj": Secret()}, html_value) == ""
    assert Template("{__class__.__mro__}").render({}, html_value) == ""


def test_header_values_lose_control_characters() -> None:
    assert header_value("a\r\nX-Evil: 1", "") == "aX-Evil: 1"


def test_body_templates_keep_json_types() -> None:
    body = {"cart": "{cart}", "note": "id={id}", "n": 3, "list": ["{id}"]}
    context = {"cart": {"p1": {"price": 2}}, "id": "ann"}
    assert render_body(body, context) == {
        "cart": {"p1": {"price": 2}},
        "note": "id=ann",
        "n": 3,
        "list": ["ann"],
    }
    assert body_fields(body) == {"cart", "id"}
    assert render_body(compile_body(body), context) == render_body(body, context)


def test_a_source_answer_nested_past_what_can_be_encoded_is_malformed() -> None:
    # orjson reads about 1,000 levels and writes 254: cached, such an answer made
    # every request for the block a 500.
    from engine.content.config import SourceConfig
    from engine.content.sources import BlockFailure, map_response

    deep = "[" * 300 + "]" * 300
    source = SourceConfig(name="deep", url="https://d.example/")
    with pytest.raises(BlockFailure) as caught:
        map_response(source, b'{"title": "x", "deep": ' + deep.encode() + b"}")
    assert caught.value.reason == "malformed"
    assert map_response(source, b'{"title": "x", "deep": [[[1]]]}')["deep"] == [[[1]]]

"""Request options from a query or a body: defaults, per-block options, clear errors."""

from __future__ import annotations

import pytest

from engine.content.config import content_config_from_mapping
from engine.content.request import from_body, from_query
from engine.errors import ValidationError

CONFIG = content_config_from_mapping(
    {"source": [{"name": "offers", "url": "https://o.example/{customer_id}"}]}
)


def test_defaults_and_query_options() -> None:
    plain = from_query("ann", [], CONFIG)
    assert plain.blocks == CONFIG.default_blocks and plain.format == "json"
    assert plain.deadline_ms == 200
    asked = from_query(
        "ann",
        [
            ("blocks", "offers, cart,offers"),
            ("format", "html"),
            ("deadline_ms", "120"),
            ("recommendations.limit", "6"),
            ("offers.placement", "hero"),
            ("_cb", "1"),
            ("exp", "9"),
            ("sig", "x"),
        ],
        CONFIG,
    )
    assert asked.blocks == ("offers", "cart") and asked.format == "html"
    assert asked.deadline_ms == 120
    assert asked.option("recommendations") == {"limit": 6}
    assert asked.option("offers") == {"placement": "hero"}


def test_body_options() -> None:
    body = {
        "blocks": ["cart", "offers"],
        "deadline_ms": 90,
        "options": {"offers": {"placement": "footer", "n": 2}},
    }
    asked = from_body("ann", body, [("format", "html")], CONFIG)
    assert asked.blocks == ("cart", "offers") and asked.deadline_ms == 90
    assert asked.format == "html" and asked.option("offers") == {"placement": "footer", "n": 2}


@pytest.mark.parametrize(
    ("pairs", "field"),
    [
        ([("blocks", "cart,weather")], "blocks[1]"),
        ([("blocks", "")], "blocks"),
        ([("format", "xml")], "format"),
        ([("deadline_ms", "0")], "deadline_ms"),
        ([("deadline_ms", "5000")], "deadline_ms"),
        ([("deadline_ms", "soon")], "deadline_ms"),
        ([("recommendations.limit", "500")], "recommendations.limit"),
        ([("colour", "red")], "colour"),
        # digits int() refuses, or too many for it: once a 500
        ([("deadline_ms", "\u00b2")], "deadline_ms"),
        ([("deadline_ms", "1" * 5000)], "deadline_ms"),
        ([("recommendations.limit", "\u00b2")], "recommendations.limit"),
    ],
)
def test_query_errors_name_the_parameter(pairs: list, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        from_query("ann", pairs, CONFIG)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"blocks": "cart", "extra": 1}, "body.extra"),
        ({"blocks": [1]}, "body.blocks"),
        ({"options": {"weather": {}}}, "body.options.weather"),
        ({"options": {"offers": {"x": {"deep": 1}}}}, "body.options.offers"),
        ({"deadline_ms": True}, "body.deadline_ms"),
        ({"deadline_ms": "\u00b2"}, "body.deadline_ms"),
        ({"options": {"recommendations": {"limit": "\u00b2"}}}, "recommendations.limit"),
    ],
)
def test_body_errors_name_the_field(body: object, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        from_body("ann", body, [], CONFIG)
    assert caught.value.field == field

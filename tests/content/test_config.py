"""The [content] table: defaults, every kind of entry, and errors that name the key path."""

from __future__ import annotations

import pytest

from engine.content.config import ContentConfig, content_config_from_mapping
from engine.errors import ConfigError


def source(**extra: object) -> dict:
    return {"name": "offers", "url": "https://o.example/x?c={customer_id}", **extra}


def test_no_table_gives_the_defaults() -> None:
    config = content_config_from_mapping(None)
    assert config == ContentConfig()
    assert config.deadline_ms == 200 and config.sources == ()
    assert config.default_blocks == ("profile", "cart", "recommendations")


def test_a_full_table() -> None:
    config = content_config_from_mapping(
        {
            "deadline_ms": 150,
            "max_deadline_ms": 500,
            "default_blocks": ["cart", "offers"],
            "blocks": {"recommendations": {"limit": 6, "fallback_html": "<p>Popular</p>"}},
            "source": [
                source(
                    method="post",
                    headers={"Authorization": "Bearer t", "X-Tier": "{traits.tier}"},
                    body={"cart": "{cart}"},
                    timeout_ms=80,
                    ttl_s=30,
                    select="data.offers",
                    fields={"title": "headline"},
                    item_html="<li>{title}</li>",
                    on_failure="omit",
                    vary=["cart_updated"],
                )
            ],
        }
    )
    offers = config.source("offers")
    assert offers is not None and offers.method == "POST" and offers.timeout_ms == 80
    assert offers.headers == (("Authorization", "Bearer t"), ("X-Tier", "{traits.tier}"))
    assert offers.needs_profile and offers.template_fields == {"customer_id", "traits.tier", "cart"}
    assert config.block("recommendations").limit == 6 and config.block("cart").limit == 4
    assert config.block_names[-1] == "offers"


def test_sources_that_need_only_the_id_can_start_before_the_profile() -> None:
    config = content_config_from_mapping(
        {"source": [source(url="https://x/{options.p}/{customer_id}")]}
    )
    assert not config.sources[0].needs_profile


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"deadline": 100}, "content.deadline"),
        ({"deadline_ms": "fast"}, "content.deadline_ms"),
        ({"deadline_ms": 300, "max_deadline_ms": 250}, "content.max_deadline_ms"),
        ({"unknown_customer": "ignore"}, "content.unknown_customer"),
        ({"default_blocks": ["cart", "nope"]}, "content.default_blocks[1]"),
        ({"product_url": "https://x/{product_id"}, "content.product_url"),
        ({"blocks": {"weather": {}}}, "content.blocks.weather"),
        ({"blocks": {"cart": {"colour": "red"}}}, "content.blocks.cart.colour"),
        ({"source": {"name": "x"}}, "content.source"),
        ({"source": [{"url": "https://x"}]}, "content.source[0].name"),
        ({"source": [source(), source(url="https://y")]}, "content.source[1].name"),
        ({"source": [source(name="cart")]}, "content.source[0].name"),
        ({"source": [source(name="Bad Name")]}, "content.source[0].name"),
        ({"source": [source(url="ftp://x")]}, "content.source[0].url"),
        ({"source": [source(url="https://x/{customer_id")]}, "content.source[0].url"),
        ({"source": [source(method="DELETE")]}, "content.source[0].method"),
        ({"source": [source(timeout_ms=0)]}, "content.source[0].timeout_ms"),
        ({"source": [source(ttl_s=-1)]}, "content.source[0].ttl_s"),
        ({"source": [source(on_failure="panic")]}, "content.source[0].on_failure"),
        ({"source": [source(headers={"X": 1})]}, "content.source[0].headers"),
        ({"source": [source(html="<p>{title</p>")]}, "content.source[0].html"),
        ({"source": [source(body={"a": "{x|nope}"})]}, "content.source[0].body"),
        ({"source": [source(retries=3)]}, "content.source[0].retries"),
    ],
)
def test_errors_name_the_key_path(table: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        content_config_from_mapping(table)
    assert caught.value.field == field, caught.value.message


def test_environment_overrides_scalars() -> None:
    env = {
        "NUDGE_CONTENT_DEADLINE_MS": "120",
        "NUDGE_CONTENT_DEFAULT_BLOCKS": "cart, profile",
        "NUDGE_CONTENT_REDIS_CACHE": "false",
    }
    config = content_config_from_mapping({"deadline_ms": 300, "max_deadline_ms": 400}, env)
    assert config.deadline_ms == 120 and not config.redis_cache
    assert config.default_blocks == ("cart", "profile")
    with pytest.raises(ConfigError) as caught:
        content_config_from_mapping({}, {"NUDGE_CONTENT_DEADLINE_MS": "soon"})
    assert caught.value.field == "NUDGE_CONTENT_DEADLINE_MS"

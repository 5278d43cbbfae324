"""The [delivery] table and the [[esp]] array."""

from __future__ import annotations

import pytest

from engine.config import from_mapping
from engine.errors import ConfigError


def test_esps_are_parsed_and_found_by_name() -> None:
    config = from_mapping(
        {
            "delivery": {"dispatchers": 3},
            "esp": [
                {"name": "default", "kind": "smtp", "host": "mx", "port": 587, "starttls": True},
                {
                    "name": "hook",
                    "kind": "webhook",
                    "url": "https://e.example/h",
                    "secret": "s",
                    "rate_per_s": 20,
                },
            ],
        },
        {},
    )
    assert config.delivery.dispatchers == 3
    assert config.delivery.esp("default").starttls is True
    assert config.delivery.esp("hook").rate_per_s == 20.0
    assert config.delivery.esp("nope") is None


def test_secrets_come_from_the_environment() -> None:
    env = {"NUDGE_ESP_MY_SG_API_KEY": "SG.env", "NUDGE_DELIVERY_MAX_ATTEMPTS": "9"}
    config = from_mapping({"esp": [{"name": "my-sg", "kind": "sendgrid", "api_key": "x"}]}, env)
    assert config.delivery.esp("my-sg").api_key == "SG.env"
    assert config.delivery.max_attempts == 9


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"delivery": {"dispatcherz": 1}}, "delivery.dispatcherz"),
        ({"delivery": {"max_attempts": 0}}, "delivery.max_attempts"),
        ({"delivery": {"backoff_max_ms": 1}}, "delivery.backoff_max_ms"),
        ({"esp": {"name": "x"}}, "esp"),
        ({"esp": [{"kind": "smtp"}]}, "esp[0].name"),
        ({"esp": [{"name": "x", "kind": "pigeon"}]}, "esp[0].kind"),
        (
            {"esp": [{"name": "x", "kind": "webhook", "url": "ftp://x", "secret": "s"}]},
            "esp[0].url",
        ),
        ({"esp": [{"name": "x", "kind": "webhook", "url": "https://x"}]}, "esp[0].secret"),
        ({"esp": [{"name": "x", "kind": "sendgrid"}]}, "esp[0].api_key"),
        ({"esp": [{"name": "x", "kind": "smtp", "port": "25"}]}, "esp[0].port"),
        ({"esp": [{"name": "x", "kind": "smtp", "colour": 1}]}, "esp[0].colour"),
        ({"esp": [{"name": "x", "kind": "smtp"}, {"name": "x", "kind": "smtp"}]}, "esp[1].name"),
        (
            {"esp": [{"name": "x", "kind": "smtp", "starttls": True, "use_tls": True}]},
            "esp[0].starttls",
        ),
    ],
)
def test_errors_name_the_setting(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_mapping(data, {})
    assert caught.value.field == field

"""Text from outside (headers, query parameters, cookies, signatures): digits int()
refuses, or too many for it, are refused or ignored, never a 500; and console
cookies nobody could have been issued."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from engine.bodies import read_limited
from engine.coerce import whole_number
from engine.console.session import Sessions
from engine.delivery.adapters import webhook
from engine.errors import PayloadTooLarge, ValidationError

ODD = ("\u00b2", "\u0663", "1" * 5000, "", "-1", "1.5", " 7")


def test_whole_number_takes_plain_ascii_digits_only() -> None:
    assert whole_number("0") == 0 and whole_number("1700000000") == 1_700_000_000
    assert whole_number("9" * 18) == 10**18 - 1
    for text in (*ODD, "9" * 19):
        assert whole_number(text) is None


@pytest.mark.parametrize("text", ODD)
def test_odd_numbers_from_outside_are_refused_not_raised(text: str) -> None:
    assert webhook.verify("k", b"{}", text, "v1=00", now=1_700_000_000) is False  # receiver
    sessions = Sessions(("dev-admin-key",), ttl_s=60)
    assert sessions.valid(f"{text}.mac", now=0.0) is False  # console cookie


def test_with_no_admin_key_no_console_cookie_is_valid() -> None:
    # The cookie key came from the admin keys alone: with none, it was a public
    # constant, and anyone could make a cookie the console accepted.
    keyless = Sessions((), ttl_s=60)
    assert keyless.valid(keyless.issue(0.0), now=1.0) is False
    keyed = Sessions(("an-admin-key",), ttl_s=60)
    assert keyed.valid(keyed.issue(0.0), now=1.0) is True


def test_a_content_length_that_is_no_number_is_a_400_naming_it() -> None:
    def request(length: str) -> Request:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        headers = [(b"content-length", length.encode("latin-1"))]
        return Request({"type": "http", "method": "POST", "headers": headers}, receive)

    for odd in ("\u00b2", "12a", "-1"):
        with pytest.raises(ValidationError) as caught:
            asyncio.run(read_limited(request(odd), 100))
        assert caught.value.field == "Content-Length"
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_limited(request("9" * 30), 100))
    assert asyncio.run(read_limited(request("2"), 100)) == b"{}"

"""Signed content URLs: valid as issued, invalid when anything signed changes or expires."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from engine.content.signing import signature, signed_url, verify
from engine.errors import AuthError

KEY, NOW = "content-key-1", 1_800_000_000


def split(url: str) -> tuple[str, list[tuple[str, str]]]:
    parts = urlsplit(url)
    return parts.path, parse_qsl(parts.query, keep_blank_values=True)


def test_a_signed_url_verifies_and_parameter_order_does_not_matter() -> None:
    path, pairs = split(
        signed_url(
            KEY, "/v1/content/ann", {"blocks": "cart,profile", "format": "html"}, expires=NOW + 60
        )
    )
    verify(["other", KEY], "GET", path, pairs, now=NOW)
    verify([KEY], "GET", path, list(reversed(pairs)), now=NOW)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda path, pairs: ("/v1/content/bob", pairs), "bad_signature"),
        (lambda path, pairs: (path, [*pairs, ("blocks", "profile")]), "bad_signature"),
        (
            lambda path, pairs: (path, [(k, "html" if k == "format" else v) for k, v in pairs]),
            "bad_signature",
        ),
        (
            lambda path, pairs: (
                path,
                [(k, str(NOW + 999) if k == "exp" else v) for k, v in pairs],
            ),
            "bad_signature",
        ),
        (lambda path, pairs: (path, [p for p in pairs if p[0] != "sig"]), "unauthorized"),
        (lambda path, pairs: (path, [p for p in pairs if p[0] != "exp"]), "unauthorized"),
    ],
)
def test_any_change_to_what_was_signed_is_refused(change, code: str) -> None:
    path, pairs = split(signed_url(KEY, "/v1/content/ann", {"format": "json"}, expires=NOW + 60))
    path, pairs = change(path, pairs)
    with pytest.raises(AuthError) as caught:
        verify([KEY], "GET", path, pairs, now=NOW)
    assert caught.value.code == code


def test_expired_and_wrongly_keyed_urls_are_refused() -> None:
    path, pairs = split(signed_url(KEY, "/v1/content/ann", {}, expires=NOW - 1))
    with pytest.raises(AuthError) as caught:
        verify([KEY], "GET", path, pairs, now=NOW)
    assert caught.value.code == "signature_expired" and caught.value.field == "exp"
    path, pairs = split(signed_url("not-a-key", "/v1/content/ann", {}, expires=NOW + 60))
    with pytest.raises(AuthError):
        verify([KEY], "GET", path, pairs, now=NOW)


@pytest.mark.parametrize(
    ("exp", "sig", "code"),
    [
        ("\u00b2", "x", "unauthorized"),  # a digit int() refuses
        ("9" * 5000, "x", "unauthorized"),  # past int()'s digit limit
        (str(NOW + 60), "\u00e9", "bad_signature"),  # compare_digest refuses non-ASCII str
    ],
)
def test_odd_signed_parameters_are_refused_not_raised(exp: str, sig: str, code: str) -> None:
    with pytest.raises(AuthError) as caught:
        verify([KEY], "GET", "/v1/content/ann", [("exp", exp), ("sig", sig)], now=NOW)
    assert caught.value.code == code


def test_the_body_and_method_are_signed_too() -> None:
    body = b'{"blocks": ["cart"]}'
    path, pairs = split(
        signed_url(KEY, "/v1/content/ann", {}, expires=NOW + 60, method="POST", body=body)
    )
    verify([KEY], "POST", path, pairs, now=NOW, body=body)
    for method, sent in (("POST", b'{"blocks": ["profile"]}'), ("GET", body)):
        with pytest.raises(AuthError):
            verify([KEY], method, path, pairs, now=NOW, body=sent)
    assert signature(KEY, "get", "/p", [("a", "1")]) == signature(KEY, "GET", "/p", [("a", "1")])

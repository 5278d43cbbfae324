"""Signed tracking tokens: round trips, tampering, forgery, kinds."""

from __future__ import annotations

import pytest

from engine.tracking import CLICK, OPEN, UNSUBSCRIBE, Token, TokenSigner
from engine.tracking.tokens import BadToken

SIGNER = TokenSigner("s3cret", "https://nudge.example.com/")


def test_round_trip_of_every_kind() -> None:
    for token in (
        Token(OPEN, "send-1", "ann"),
        Token(CLICK, "send-1", "ann ü/1", url="https://shop.example/p/1?x=1#y", rule="cart"),
        Token(UNSUBSCRIBE, "send-2", "bob", variant="B"),
    ):
        assert SIGNER.verify(SIGNER.token(token)) == token


def test_links_carry_the_base_and_a_verifiable_token() -> None:
    url = SIGNER.click_url("s1", "ann", "https://shop.example/cart")
    assert url.startswith("https://nudge.example.com/t/c/")
    assert SIGNER.verify(url.rsplit("/", 1)[1], CLICK).url == "https://shop.example/cart"
    pixel = SIGNER.open_url("s1", "ann")
    assert pixel.endswith(".gif") and "/t/o/" in pixel
    assert SIGNER.verify(pixel.rsplit("/", 1)[1][:-4], OPEN).customer == "ann"
    assert "/u/" in SIGNER.unsubscribe_url("s1", "ann")


def test_tampered_forged_and_malformed_tokens_are_refused() -> None:
    good = SIGNER.token(Token(CLICK, "s1", "ann", url="https://shop.example/"))
    body, mac = good.split(".")
    evil = TokenSigner("s3cret").token(Token(CLICK, "s1", "ann", url="https://evil.example/"))
    swapped = evil.split(".")[0] + "." + mac  # someone else's payload, our signature
    forged = TokenSigner("other").token(Token(CLICK, "s1", "ann", url="https://shop.example/"))
    flipped = body[:-1] + ("A" if body[-1] != "A" else "B") + "." + mac
    for text in (swapped, forged, flipped, "", "abc", "a.b.c", "!!.??", "x" * 5000):
        with pytest.raises(BadToken):
            SIGNER.verify(text)


def test_a_token_of_another_kind_is_refused_where_a_kind_is_required() -> None:
    opened = SIGNER.token(Token(OPEN, "s1", "ann"))
    with pytest.raises(BadToken):
        SIGNER.verify(opened, UNSUBSCRIBE)


def test_a_click_needs_its_url_and_a_secret_is_required() -> None:
    with pytest.raises(ValueError):
        SIGNER.token(Token(CLICK, "s1", "ann"))
    with pytest.raises(ValueError):
        TokenSigner("")

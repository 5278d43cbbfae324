"""Email tracking and consent links: signed tokens for opens, clicks and unsubscribes."""

from engine.tracking.tokens import CLICK, OPEN, UNSUBSCRIBE, Token, TokenSigner

__all__ = ["CLICK", "OPEN", "UNSUBSCRIBE", "Token", "TokenSigner"]

"""Console logins: an admin key typed once into a form buys a signed, expiring cookie.

A browser cannot add a Bearer header to a page load, so /console/login checks the
key and sets `nudge_console` (HttpOnly, SameSite=Strict, Path=/console). The
cookie holds an expiry and an HMAC over it, keyed by the configured admin keys:
changing those keys logs every console out.
"""

from __future__ import annotations

import hashlib
import hmac

from engine.coerce import whole_number

COOKIE = "nudge_console"


class Sessions:
    """Makes and checks console session cookies."""

    def __init__(self, admin_keys: tuple[str, ...], ttl_s: float):
        material = b"\x00".join(k.encode() for k in sorted(admin_keys))
        self._key = hashlib.sha256(b"nudge-console\x00" + material).digest()
        self.ttl_s = ttl_s
        # With no admin key the cookie key would be a public constant: nobody can log
        # in then, and no cookie is valid.
        self._enabled = bool(admin_keys)

    def _mac(self, expires: int) -> str:
        return hmac.new(self._key, str(expires).encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, now: float) -> str:
        """A cookie value valid for ttl_s from `now`."""
        expires = int(now + self.ttl_s)
        return f"{expires}.{self._mac(expires)}"

    def valid(self, value: str | None, now: float) -> bool:
        """True for a cookie this engine issued that has not expired."""
        if not value or not self._enabled:
            return False
        expires, _, mac = value.partition(".")
        at = whole_number(expires)
        if at is None or at < now:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(at).encode())

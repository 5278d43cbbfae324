"""API keys and roles: who may call what."""

from __future__ import annotations

import base64
import binascii
import hmac

from engine.config import AuthConfig
from engine.errors import AuthError, ForbiddenError

WRITE, CONTENT, ADMIN = "write", "content", "admin"


class KeyRing:
    """Maps each configured key to its role."""

    def __init__(self, auth: AuthConfig):
        self._roles: dict[str, str] = {}
        for role, keys in (
            (WRITE, auth.write_keys),
            (CONTENT, auth.content_keys),
            (ADMIN, auth.admin_keys),
        ):
            for key in keys:
                self._roles[key] = role

    def role_of(self, header: str | None) -> str:
        """The role of the key in an Authorization header (Basic key: or Bearer key)."""
        if not header:
            raise AuthError(
                "missing Authorization header (Basic with the key as user name, or Bearer)"
            )
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError("malformed Basic credentials") from None
            key = decoded.partition(":")[0]
        elif scheme == "bearer":
            key = value.strip()
        else:
            raise AuthError(f"unsupported authorization scheme {scheme!r}")
        for known, role in self._roles.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return role
        raise AuthError("unknown API key")

    def require(self, header: str | None, *allowed: str) -> str:
        """The caller's role, if it is admin or one of `allowed`; else raise."""
        role = self.role_of(header)
        if role != ADMIN and role not in allowed:
            raise ForbiddenError(f"a {role} key cannot call this endpoint")
        return role

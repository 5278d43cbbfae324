"""Signed content URLs, for ESP templates that cannot send an Authorization header.

`sig` is HMAC-SHA256, keyed by a content key, over the method, the path, the
query without `sig` (parameters sorted, so reordering them keeps it valid) and
the SHA-256 of the body. `exp` (epoch seconds) is part of the query and so of
the signature: past it the URL stops working.

>>> url = signed_url("k", "/v1/content/ann", {"blocks": "cart"}, expires=2_000_000_000)
>>> url.startswith("/v1/content/ann?blocks=cart&exp=2000000000&sig=")
True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlencode

from engine.coerce import whole_number
from engine.errors import AuthError

SIG, EXP = "sig", "exp"
_EMPTY_BODY = hashlib.sha256(b"").hexdigest()


def _canonical(pairs: Iterable[tuple[str, str]]) -> str:
    kept = sorted((k, v) for k, v in pairs if k != SIG)
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in kept)


def signature(
    key: str, method: str, path: str, pairs: Iterable[tuple[str, str]], body: bytes = b""
) -> str:
    """The `sig` value for a request (base64url, no padding)."""
    body_hash = hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY
    message = "\n".join((method.upper(), path, _canonical(pairs), body_hash)).encode()
    digest = hmac.new(key.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signed_url(
    key: str,
    path: str,
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    expires: int,
    method: str = "GET",
    body: bytes = b"",
) -> str:
    """`path?query&exp=…&sig=…`, valid until the epoch second `expires`."""
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    pairs = [(k, str(v)) for k, v in pairs if k not in (SIG, EXP)] + [(EXP, str(int(expires)))]
    sig = signature(key, method, path, pairs, body)
    return f"{path}?{urlencode([*pairs, (SIG, sig)])}"


def verify(
    keys: Iterable[str],
    method: str,
    path: str,
    pairs: list[tuple[str, str]],
    *,
    now: float,
    body: bytes = b"",
) -> None:
    """Accept a signed request or raise AuthError naming what is wrong."""
    given = [v for k, v in pairs if k == SIG]
    expiries = [v for k, v in pairs if k == EXP]
    if len(given) != 1:
        raise AuthError("give exactly one sig parameter", field=SIG)
    expires = whole_number(expiries[0]) if len(expiries) == 1 else None
    if expires is None:
        raise AuthError("a signed URL needs one exp parameter (epoch seconds)", field=EXP)
    if expires < now:
        raise AuthError("the signed URL has expired", field=EXP, code="signature_expired")
    # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    sig = given[0].encode("utf-8", "surrogatepass")
    for key in keys:
        if hmac.compare_digest(signature(key, method, path, pairs, body).encode(), sig):
            return
    raise AuthError("bad signature", field=SIG, code="bad_signature")

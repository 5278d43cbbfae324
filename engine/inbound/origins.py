"""Which web origins may post events from a browser: checked once, when the config loads.

Pure: `check_origins(("https://Shop.example:443/",))` -> `("https://shop.example",)`,
the form a browser sends in its Origin header, so the comparison is a plain lookup.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import idna

from engine.errors import ConfigError

_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_origins(origins: tuple[str, ...]) -> tuple[str, ...]:
    """The origins as browsers spell them; ConfigError naming one that is not scheme://host[:port]."""
    out: list[str] = []
    for i, origin in enumerate(origins):
        where = f"browser.allowed_origins[{i}]"
        if origin == "*":
            out.append(origin)
            continue
        parts = urlsplit(origin.strip()) if isinstance(origin, str) else None
        try:
            port = parts.port if parts else None
        except ValueError:  # a port that is not a number, or out of range
            parts = None
        if (
            parts is None
            or parts.scheme.lower() not in _DEFAULT_PORTS
            or not parts.hostname
            or parts.path.strip("/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            raise ConfigError(
                f"{where} must be an origin such as https://shop.example, got {origin!r}",
                field=where,
            )
        scheme = parts.scheme.lower()
        hostname = parts.hostname
        if not hostname.isascii():
            # Browsers send a name's punycode (https://xn--bcher-kva.example) in Origin,
            # by UTS 46 without the old mappings (straße stays straße: xn--strae-oqa),
            # not Python's IDNA 2003 codec (which makes it strasse).
            try:
                hostname = _browser_ascii(hostname)
            except (idna.IDNAError, UnicodeError):
                raise ConfigError(
                    f"{where}: {origin!r} has a host name no browser can send", field=where
                ) from None
        host = hostname if ":" not in hostname else f"[{hostname}]"
        if port is not None and port != _DEFAULT_PORTS[scheme]:
            host += f":{port}"
        out.append(f"{scheme}://{host}")
    return tuple(dict.fromkeys(out))


def _browser_ascii(hostname: str) -> str:
    """A Unicode host name as the WHATWG URL standard (browsers) writes it in Origin:
    UTS 46 mapping, non-transitional, without IDNA 2008's stricter label rules
    (underscores, emoji and -- in labels pass, as browsers let them)."""
    mapped = idna.uts46_remap(hostname, std3_rules=False, transitional=False)
    return ".".join(
        label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
        for label in mapped.split(".")
    )

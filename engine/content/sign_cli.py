"""`nudge sign-url`: a signed /v1/content URL for templates that cannot send headers."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse

from engine.config import load
from engine.content.signing import signed_url
from engine.errors import EngineError
from engine.rules.durations import parse_duration


def _expiry(text: str) -> int:
    """Seconds in "3600", "15m", "12h" or "30d" (the rules' duration syntax)."""
    try:
        seconds = parse_duration(text if not text.isdigit() else int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the expiry must be positive")
    return int(seconds)


def main(argv: list[str]) -> int:
    """Print a signed content URL for one customer."""
    parser = argparse.ArgumentParser(prog="nudge sign-url", description=__doc__)
    parser.add_argument("customer")
    parser.add_argument("--blocks", help="comma-separated blocks (default: the configured ones)")
    parser.add_argument("--format", choices=["json", "html"])
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--expires-in", type=_expiry, default=30 * 86400)
    parser.add_argument("--key", help="a content key (default: the first in the config)")
    parser.add_argument("--base", help="prefix, e.g. https://nudge.example.com")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except EngineError as exc:
        print(f"nudge: error ({exc.field}): {exc.message}", file=sys.stderr)
        return 2
    key = args.key or next(iter(config.auth.content_keys), None)
    if not key:
        print("nudge: error: no content key configured; pass --key", file=sys.stderr)
        return 2
    params: list[tuple[str, str]] = []
    if args.blocks:
        params.append(("blocks", args.blocks))
    if args.format:
        params.append(("format", args.format))
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--param wants NAME=VALUE, got {item!r}")
        params.append((name, value))
    # Signed over the path as the server routes it (decoded), sent percent-encoded.
    path = "/v1/content/" + args.customer
    url = signed_url(key, path, params, expires=int(time.time()) + args.expires_in)
    url = "/v1/content/" + urllib.parse.quote(args.customer, safe="") + url[len(path) :]
    server = config.server
    base = args.base if args.base is not None else f"http://{server.host}:{server.port}"
    print(base.rstrip("/") + url)
    return 0

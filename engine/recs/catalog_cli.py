"""`nudge catalog import FILE`: send a CSV or JSONL catalog to the running engine.

Every record is checked first (errors name the line and field); the valid
ones go to `POST /v1/catalog/products` in chunks, with an admin key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.admin_client import admin_key, call_engine, engine_url
from engine.errors import EngineError
from engine.recs.catalog import read_products

_CHUNK = 1000


def _post(url: str, key: str, products: list[dict]) -> int:
    """How many of `products` the engine upserted."""
    reply = call_engine(
        url, key, "POST", "/v1/catalog/products", {"products": products}, timeout=60
    )
    upserted = reply.get("upserted") if isinstance(reply, dict) else None
    if not isinstance(upserted, int):
        raise EngineError(f"{url} answered without the products upserted: is it Nudge?")
    return upserted


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nudge catalog`."""
    parser = argparse.ArgumentParser(prog="nudge catalog", description="the product catalog")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="upsert products from a CSV or JSONL file")
    imp.add_argument("file")
    imp.add_argument("--format", choices=("csv", "jsonl"), help="default: from the extension")
    imp.add_argument("--url", help="the engine's base URL (default: from the config)")
    imp.add_argument("--key", help="an admin key (default: the first in the config)")
    imp.add_argument("--config")
    args = parser.parse_args(argv)
    from engine.config import load

    config = load(args.config)
    url, key = engine_url(config, args.url), admin_key(config, args.key)
    path = Path(args.file)
    fmt = args.format or ("jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"nudge catalog: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    good, bad = [], 0
    for line, found in read_products(text, fmt=fmt):
        if isinstance(found, dict):
            good.append(found)
        else:
            bad += 1
            print(f"{path}:{line}: {found.field}: {found.message}", file=sys.stderr)
    sent = 0
    try:
        for start in range(0, len(good), _CHUNK):
            sent += _post(url, key, good[start : start + _CHUNK])
    except EngineError as exc:
        print(f"nudge catalog: {exc.message}", file=sys.stderr)
        return 2
    print(f"imported {sent} products from {path} ({bad} rejected)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

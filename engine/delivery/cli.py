"""`nudge render` (preview a template) and `nudge dlq list|show|replay` (dead letters)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError

from engine.admin_client import admin_key, call_engine, engine_url
from engine.config import Config, load
from engine.content.blocks import Links
from engine.delivery.compose import Composer
from engine.delivery.templates import TemplateSet
from engine.errors import EngineError
from engine.store import shown_url
from engine.tracking import TokenSigner


def _fail(command: str, message: str) -> int:
    print(f"nudge {command}: {message}", file=sys.stderr)
    return 2


def _http(
    config: Config, url: str | None, key: str | None, method: str, path: str, body: Any = None
) -> Any:
    """Call the running engine's admin API; EngineError with its message on failure."""
    return call_engine(engine_url(config, url), admin_key(config, key), method, path, body)


# -- render ---------------------------------------------------------------------------
def render_main(argv: list[str]) -> int:
    """Preview one template for a live profile or a fixture file."""
    parser = argparse.ArgumentParser(
        prog="nudge render", description="Render an email template for a profile or a fixture."
    )
    parser.add_argument("template", help="a template name, e.g. cart-reminder-classic")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", metavar="ID", help="a customer of the running engine")
    source.add_argument(
        "--fixture",
        metavar="FILE",
        help='JSON: a profile, or {"profile": {...}, "payload": {...}, "send": {...}}',
    )
    parser.add_argument("--part", choices=["all", "subject", "html", "text"], default="all")
    parser.add_argument("--templates", help="template directory (default: from the config)")
    parser.add_argument("--url", help="the engine's base URL, for --profile")
    parser.add_argument("--key", help="an admin key, for --profile")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        payload: dict = {}
        extra: dict = {}
        if args.fixture:
            data = orjson.loads(Path(args.fixture).read_bytes())
            if "profile" in data:
                payload = data.get("payload") or {}
                extra = data.get("send") or {}
                profile = data["profile"]
            else:
                profile = data
        else:
            quoted = urllib.parse.quote(args.profile, safe="")
            profile = _http(config, args.url, args.key, "GET", f"/v1/profiles/{quoted}")
        templates = TemplateSet(args.templates or config.delivery.templates_dir)
        composer = Composer(
            config.delivery,
            signer=TokenSigner(config.tracking.tracking_secret, config.tracking.public_url),
            links=Links(config.content.product_url, config.content.checkout_url),
            templates=templates,
        )
        send = {
            "send_id": "preview",
            "rule": None,
            "step": 1,
            "variant": None,
            "customer": profile.get("id", "preview"),
            "template": args.template,
            "payload": payload,
            **extra,
        }
        send["template"] = args.template
        rendered = templates.render(args.template, composer.context(send, profile))
    except (OSError, orjson.JSONDecodeError) as exc:
        return _fail("render", str(exc))
    except EngineError as exc:
        return _fail("render", exc.message)
    if args.part == "subject":
        print(rendered.subject)
    elif args.part == "html":
        print(rendered.html)
    elif args.part == "text":
        print(rendered.text, end="")
    else:
        print(f"Subject: {rendered.subject}\n\n--- text ---\n{rendered.text}\n--- html ---")
        print(rendered.html)
    return 0


# -- dlq ------------------------------------------------------------------------------
def dlq_main(argv: list[str]) -> int:
    """Inspect and replay the dead-letter stream."""
    parser = argparse.ArgumentParser(
        prog="nudge dlq", description="Sends that failed every attempt: list, show, replay."
    )
    parser.add_argument("--config")
    parser.add_argument("--url", help="the engine's base URL (default: from the config)")
    parser.add_argument("--key", help="an admin key (default: the first in the config)")
    parser.add_argument(
        "--redis-url", help="read Redis directly instead of asking the running engine"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=100)
    show = sub.add_parser("show", help="one dead letter in full")
    show.add_argument("id")
    again = sub.add_parser("replay", help="put dead letters back in the outbox")
    again.add_argument("ids", nargs="*")
    again.add_argument("--all", action="store_true", help="replay every dead letter")
    args = parser.parse_args(argv)
    if args.action == "replay" and not args.ids and not args.all:
        parser.error("name the dead letters to replay, or --all")
    try:
        config = load(args.config)
        if args.redis_url:
            result = asyncio.run(_dlq_redis(config, args))
        else:
            result = _dlq_http(config, args)
    except EngineError as exc:
        return _fail("dlq", exc.message)
    except (RedisError, OSError, ValueError) as exc:  # --redis-url: unreachable, or no URL
        return _fail("dlq", f"cannot use Redis at {shown_url(args.redis_url)}: {exc}")
    _print_dlq(args, result)
    return 0


def _dlq_http(config: Config, args: argparse.Namespace) -> Any:
    if args.action == "list":
        return _http(config, args.url, args.key, "GET", f"/v1/dlq?limit={args.limit}")
    if args.action == "show":
        quoted = urllib.parse.quote(args.id, safe="")
        return _http(config, args.url, args.key, "GET", f"/v1/dlq/{quoted}")
    body = {"all": True} if args.all else {"ids": args.ids}
    return _http(config, args.url, args.key, "POST", "/v1/dlq/replay", body)


async def _dlq_redis(config: Config, args: argparse.Namespace) -> Any:
    from engine.delivery.ledger import Ledger
    from engine.delivery.routes import replay
    from engine.store import connect

    ledger = Ledger(connect(args.redis_url), config.engine.shards)
    try:
        if args.action == "list":
            return {"dead_letters": await ledger.dead_letters(count=args.limit)}
        if args.action == "show":
            return await ledger.dead_letter_get(args.id)
        return {"replayed": await replay(ledger, None if args.all else args.ids)}
    finally:
        await ledger.close()


def _print_dlq(args: argparse.Namespace, result: Any) -> None:
    if args.json or args.action == "show":
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    if args.action == "replay":
        for item in result["replayed"]:
            print(f"replayed {item['id']} -> outbox {item['outbox_id']}")
        print(f"{len(result['replayed'])} replayed")
        return
    letters = result["dead_letters"]
    for letter in letters:
        send = letter["send"]
        when = datetime.fromtimestamp(letter["at"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(
            f"{letter['id']:<24} {when}  {send.get('rule') or '-':<24} {send['customer']:<16} "
            f"esp={send.get('esp')} attempts={letter['attempts']}  {letter['error']}"
        )
    print(f"{len(letters)} dead letter(s)")

"""The `nudge` command: serve, lint, simulate, explain, config."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime

import orjson

from engine.admin_client import admin_key, call_engine, engine_url
from engine.config import Config, load
from engine.errors import EngineError

# Subcommands whose own module parses the rest of the command line.
_DELEGATED = {
    "lint": ("engine.rules.lint", "main", "check a rule set: typos, overlaps, unreachable steps"),
    "simulate": ("engine.simulate", "main", "run a scripted scenario on a virtual clock"),
    "explain-scenario": (
        "engine.simulate",
        "explain_main",
        "run a scenario, then explain one customer",
    ),
    "sign-url": ("engine.content.sign_cli", "main", "a signed /v1/content URL for ESP templates"),
    "bench": ("benchmarks.bench", "main", "load test: shoppers, replay, triggers, content"),
    "render": ("engine.delivery.cli", "render_main", "preview an email template"),
    "dlq": ("engine.delivery.cli", "dlq_main", "list, show and replay dead-lettered sends"),
    "catalog": ("engine.recs.catalog_cli", "main", "import products from a CSV or JSONL file"),
    "recs": ("engine.recs.evaluate", "main", "evaluate recommendations offline (hit rate, NDCG)"),
    "train": ("engine.insight.train", "main", "train a churn or high-value model"),
    "rfm": ("engine.insight.report", "main", "RFM segment sizes of a transactions file"),
}


def _serve_config(args: argparse.Namespace) -> Config:
    """The config `nudge serve` runs: file, then environment, then the command line's flags.

    The flags go in as the environment's highest layer, so they are parsed and
    checked with everything else: a flag replaces a bad or unsafe value from the
    file or the environment (a Kubernetes NUDGE_PORT=tcp://... beside --port)
    instead of being applied after it was refused.
    """
    flags = {
        "NUDGE_HOST": args.host,
        "NUDGE_PORT": args.port,
        "NUDGE_WORKERS": args.workers,
        "NUDGE_DATA_DIR": args.data_dir,
        "NUDGE_SHARDS": args.shards,
        "NUDGE_REDIS_URL": args.redis_url,
        "NUDGE_RAY_ADDRESS": args.ray_address,
    }
    given = {name: str(value) for name, value in flags.items() if value is not None}
    return load(args.config, env={**os.environ, **given})


def _explain(args: argparse.Namespace) -> int:
    """Ask a running engine why each rule did or did not email a customer."""
    config = load(args.config)
    quoted = urllib.parse.quote(args.customer, safe="")
    try:
        body = call_engine(
            engine_url(config, args.url),
            admin_key(config, args.key),
            "GET",
            f"/v1/profiles/{quoted}/explain",
        )
    except EngineError as exc:
        print(f"nudge explain: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"customer {body['customer']}, as of {_iso(body['now'])}")
    for rule in body["rules"]:
        print(f"  {rule['rule']:<28} {rule['status']}")
        for wait in rule.get("waiting", []):
            print(f"      step {wait['step']} due {wait.get('due_iso') or _iso(wait['due'])}")
        last = rule.get("last")
        if last and last.get("detail"):
            print(f"      last: {last['outcome']}: {last['detail']}")
    return 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nudge` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        import importlib

        module, function, _ = _DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])

    parser = argparse.ArgumentParser(
        prog="nudge", description="Real-time behavioural trigger engine"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the engine (embedded Redis and local Ray unless configured)"
    )
    serve.add_argument("--config", help="config.toml to read (default: ./config.toml if present)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="uvicorn worker processes")
    serve.add_argument(
        "--data-dir", help="where the embedded Redis keeps its data (default ./data)"
    )
    serve.add_argument("--shards", type=int)
    serve.add_argument("--redis-url", help="use this Redis instead of the embedded one")
    serve.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    explain = sub.add_parser("explain", help="why a customer did or did not get each email")
    explain.add_argument("customer")
    explain.add_argument("--url", help="the engine's base URL (default: from the config)")
    explain.add_argument("--key", help="an admin key (default: the first in the config)")
    explain.add_argument("--config")
    explain.add_argument("--json", action="store_true", help="print the full explanation")
    show = sub.add_parser("config", help="print the effective configuration as JSON")
    show.add_argument("--config")
    for name, (_, _, summary) in _DELEGATED.items():
        sub.add_parser(name, help=summary + f" (see nudge {name} --help)")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            from engine.serve import serve as run

            run(_serve_config(args))
        elif args.command == "explain":
            return _explain(args)
        elif args.command == "config":
            config = dataclasses.asdict(load(args.config))
            config["rules"] = [source for _, source in config["rules"]]
            print(orjson.dumps(config, option=orjson.OPT_INDENT_2).decode())
    except EngineError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"nudge: error{where}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

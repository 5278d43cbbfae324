"""The `nudge` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from engine.config import Config, from_mapping, load, validate
from engine.errors import EngineError


def _with_overrides(config: Config, args: argparse.Namespace) -> Config:
    server = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers))
        if v is not None
    }
    engine = {
        k: v
        for k, v in (
            ("data_dir", args.data_dir),
            ("shards", args.shards),
            ("redis_url", args.redis_url),
            ("ray_address", args.ray_address),
        )
        if v is not None
    }
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, **server),
        engine=dataclasses.replace(config.engine, **engine),
    )
    validate(config)
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nudge` console script."""
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
    show = sub.add_parser("config", help="print the effective configuration as JSON")
    show.add_argument("--config")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            from engine.serve import serve as run

            run(_with_overrides(load(args.config), args))
        elif args.command == "config":
            import orjson

            print(
                orjson.dumps(
                    dataclasses.asdict(load(args.config)), option=orjson.OPT_INDENT_2
                ).decode()
            )
    except EngineError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"nudge: error{where}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["from_mapping", "main"]


if __name__ == "__main__":
    sys.exit(main())

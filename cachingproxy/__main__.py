"""Command line: `cachingproxy serve [--config PATH]`."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cachingproxy: {exc}", file=sys.stderr)
        return 2
    # Imported here so that `--help` and config errors stay instant.
    from aiohttp import web

    from .app import AccessLogger, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # botocore DEBUG is wire-level, credentials included (botocore#2626): never let it through.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    server = config.server
    web.run_app(
        create_app(config),
        host=server.host,
        port=server.port,
        shutdown_timeout=server.shutdown_timeout,
        access_log_class=AccessLogger,
        print=lambda _: print(f"cachingproxy: serving http://{server.host}:{server.port}{server.mount}/",
                              flush=True),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachingproxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="config.toml", help="config file (default: ./config.toml)")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

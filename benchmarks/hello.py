"""The Python ceiling for the hot small-object column: a bare aiohttp app answering 16 KB from memory.

    python benchmarks/hello.py --port 8081 --workers 2

Same supervisor (`run_workers`), same loop choice (uvloop when installed) and one route of the same shape as
the proxy's, but no cache, no S3, no logging: whatever the proxy costs beyond this is our code.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable

from aiohttp import web

from cachingproxy.config import Config, parse_config
from cachingproxy.worker import Seat, new_event_loop
from cachingproxy.workers import run_workers

BODY = b"<!doctype html>" + b"x" * (16 * 1024 - 15)


async def _hello(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="text/html")


def _serve(config: Config, sock: socket.socket, seat: Seat, ready: Callable[[], None]) -> None:
    app = web.Application()
    app.router.add_get("/docs/{tail:.*}", _hello)
    web.run_app(app, sock=sock, access_log=None, print=lambda _: ready(), loop=new_event_loop(), shutdown_timeout=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    config = parse_config({"server": {"host": "127.0.0.1", "port": args.port}, "s3": {"bucket": "unused"}})
    return run_workers(config, args.workers, serve=_serve)


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark's stand-in for S3 across a WAN: a streaming aiohttp proxy in front of moto.

    python benchmarks/shim.py --port 9001 --upstream http://127.0.0.1:9000 --delay 0.030 [--rate BYTES_PER_S]

Every request waits `--delay` seconds before it is forwarded (the round trip to a distant region), each body
is sent at no more than `--rate` bytes a second when given (a slow S3 link; 0: as fast as it comes), and is
counted by S3 operation. `GET /__shim__/counts` answers the counters as JSON, `POST /__shim__/reset` zeroes
them. Bodies are streamed, never buffered, so a 100 MB object costs the shim no more than a chunk of memory.
Standalone on purpose: the benchmark runs it as its own process and does not import the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
from collections.abc import AsyncIterator
from urllib.parse import unquote

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

__all__ = ["main"]

CONTROL = "/__shim__/"
CHUNK_SIZE = 256 * 1024
# Hop-by-hop headers, plus the ones aiohttp sets itself from the body it sends.
_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})

COUNTS = web.AppKey("counts", collections.Counter)
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)
DELAY = web.AppKey("delay", float)
RATE = web.AppKey("rate", float)


def operation(request: web.Request) -> str:
    """GET/HEAD/LIST as S3 would bill them (path-style: /bucket/key; no key means a bucket listing)."""
    path = unquote(request.raw_path.partition("?")[0])
    _, _, key = path.lstrip("/").partition("/")
    if request.method == "GET":
        return "GET" if key else "LIST"
    return request.method


async def counts(request: web.Request) -> web.Response:
    return web.json_response(dict(request.app[COUNTS]))


async def reset(request: web.Request) -> web.Response:
    request.app[COUNTS].clear()
    return web.json_response({})


async def forward(request: web.Request) -> web.StreamResponse:
    app = request.app
    app[COUNTS][operation(request)] += 1
    await asyncio.sleep(app[DELAY])
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    body = await request.read()
    async with app[SESSION].request(request.method, app[UPSTREAM] + request.raw_path, headers=headers,
                                    data=body or None, allow_redirects=False) as upstream:
        resp = web.StreamResponse(status=upstream.status,
                                  headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP})
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        await resp.prepare(request)
        if request.method != "HEAD":
            started, sent = asyncio.get_running_loop().time(), 0
            async for chunk in upstream.content.iter_chunked(CHUNK_SIZE):
                await resp.write(chunk)
                sent += len(chunk)
                if app[RATE] > 0:
                    await asyncio.sleep(max(0.0, started + sent / app[RATE] - asyncio.get_running_loop().time()))
        await resp.write_eof()
        return resp


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    # No pool limit and no timeouts: the shim must never be what throttles or fails a benchmark.
    async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None),
                             auto_decompress=False) as session:
        app[SESSION] = session
        yield


def create_app(upstream: str, delay: float, rate: float = 0.0) -> web.Application:
    app = web.Application()
    app[COUNTS] = collections.Counter()
    app[UPSTREAM] = upstream.rstrip("/")
    app[DELAY] = delay
    app[RATE] = rate
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_get(CONTROL + "counts", counts)
    app.router.add_post(CONTROL + "reset", reset)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="moto's URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--delay", type=float, default=0.030, help="seconds added to every request")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes a second per body (0: unlimited)")
    args = parser.parse_args()
    web.run_app(create_app(args.upstream, args.delay, args.rate), host=args.host, port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()

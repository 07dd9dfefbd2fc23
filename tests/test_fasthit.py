"""fasthit.py: fresh in-memory hits answered below aiohttp's web layer send exactly what the ordinary path sends
(status line, every header, body), count and log the same, keep pipelined responses in order, and stop
writing for a client that does not read."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cachingproxy import hitpath
from cachingproxy.app import create_app, server_kwargs
from cachingproxy.appkeys import COUNTERS, SITES
from cachingproxy.config import parse_config
from cachingproxy.fasthit import FAST_HITS

from .conftest import Bucket, FakeClock, until
from .shim import Shim
from .test_accesslog import Lines
from .test_compression import text

Response = tuple[str, dict[str, str], bytes]  # status line, headers (lower-case names), body
MakeProxy = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make(aiohttp_client: Any, tmp_path: Path, shim: Shim, bucket: Bucket, clock: FakeClock) -> MakeProxy:
    """A proxy with one site at /docs (with [sites.headers]) and one at /private for other addresses only, both
    on `bucket`; `fast` sets [server] fast_hits. Each has its own cache: two workers on one cache would
    make each other re-read entries from the index (hot.Stamp), and the fast path only answers from memory."""

    async def start(fast: bool, access_log: logging.Logger | None = None) -> TestClient[Any, Any]:
        s3 = {"bucket": bucket.name, "endpoint_url": shim.url, "addressing_style": "path", "max_attempts": 1,
              "connect_timeout": 5.0, "read_timeout": 10.0, "request_timeout": 15.0}
        config = parse_config({
            "server": {"fast_hits": fast},
            "s3": s3,
            "cache": {"directory": str(tmp_path / f"cache-{fast}"), "ttl": 60},
            "sites": [{"name": "docs", "mount": "/docs", "headers": {"X-Frame-Options": "DENY"}},
                      {"name": "private", "mount": "/private", "access": {"allow": ["10.20.0.0/16"]}}],
        }, "test")
        server = TestServer(create_app(config, clock=clock))
        kwargs = server_kwargs(config)
        if access_log is not None:
            kwargs["access_log"] = access_log
        await server.start_server(**kwargs)
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return start


def answered(proxy: TestClient[Any, Any]) -> int:
    return proxy.app[FAST_HITS].answered


async def exchange(proxy: TestClient[Any, Any], requests: list[bytes]) -> list[Response]:
    """Send `requests` in one write (pipelined) on one connection and read their responses in order."""
    assert proxy.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"".join(requests))
        await writer.drain()
        return [await read_response(reader, head=request.startswith(b"HEAD")) for request in requests]
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, *lines = raw[:-4].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    length = 0 if head or " 304 " in status else int(headers["content-length"])
    return status, headers, await asyncio.wait_for(reader.readexactly(length), 10)


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: proxy.test", *headers, "", ""]).encode()


async def ready(proxy: TestClient[Any, Any], keys: dict[str, str]) -> None:
    """Every key's body, and for text its variants, held in this proxy's memory with its entry."""
    site = proxy.app[SITES]["docs"]
    # The miss stores the body; the first hit brings it into memory.
    for key in keys:
        for status, _, _ in await exchange(proxy, [get(f"/docs/{key}", "Accept-Encoding: br")] * 2):
            assert status == "HTTP/1.1 200 OK"
    for key, etag in keys.items():
        if key.endswith((".css", ".html")):
            await until(lambda key=key, etag=etag: len(site.variants.present(key, etag) or ()) == 3,
                        f"variants of {key}")
    # Each write to the cache (a body, a variant) makes this worker re-read entries from the index once
    # (hot.Stamp); with all of them done, one more request per key and coding brings each into memory.
    await exchange(proxy, [get(f"/docs/{key}", f"Accept-Encoding: {coding}") for key in keys
                           for coding in ("identity", "br", "gzip", "zstd")])


async def test_fast_answers_are_what_the_ordinary_path_sends(make: MakeProxy, bucket: Bucket) -> None:
    css = bucket.put("site.css", text(5000), ContentType="text/css")
    png = bucket.put("logo.png", bytes(range(256)) * 12, ContentType="image/png")
    index = bucket.put("guide/index.html", text(3000, "g"), ContentType="text/html")
    fast, plain = await make(True), await make(False)
    keys = {"site.css": css, "logo.png": png, "guide/index.html": index}
    for proxy in (fast, plain):
        await ready(proxy, keys)
    assert FAST_HITS not in plain.app
    variant = f'"{css[1:-1]}-br"'
    answered_here = [
        get("/docs/site.css"),
        get("/docs/site.css", "Accept-Encoding: br"),
        get("/docs/site.css", "Accept-Encoding: gzip, deflate"),
        get("/docs/site.css", "Accept-Encoding: zstd;q=0.5, gzip;q=0.4"),
        get("/docs/site.css", "Accept-Encoding: br;q=0, gzip;q=0, zstd;q=0"),
        get("/docs/site.css", f"If-None-Match: {css}"),
        get("/docs/site.css", f"If-None-Match: {variant}", "Accept-Encoding: br"),
        get("/docs/site.css", f"If-None-Match: {variant}"),  # matches, though this client gets identity
        get("/docs/site.css", "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT"),
        get("/docs/site.css?v=3", "X-Request-Id: front-7f3a"),
        get("/docs/logo.png", "Accept-Encoding: br"),
        get("/docs/guide/"),
    ]
    handed_on = [
        get("/docs/site.css", "Range: bytes=10-19"),
        get("/docs/site.css", f"If-Match: {css}"),
        get("/docs/site.css", method="HEAD"),
        get("/docs/guide"),  # the folder redirect
        get("/docs/site.css", "Connection: close"),
        get("/private/site.css"),  # 403 before anything about the object
        get("/docs/../site.css"),
        get("/healthz"),
    ]
    for requests, fast_count in ((answered_here, len(answered_here)), (handed_on, 0)):
        for request in requests:
            before = answered(fast)
            [(status, headers, body)] = await exchange(fast, [request])
            [(plain_status, plain_headers, plain_body)] = await exchange(plain, [request])
            # Every other header, Date and Age included, is the stored entry's (the fake clock stands still);
            # a response about no object (a redirect, a refusal) has aiohttp's Date, the wall clock's second.
            if "x-cache" not in headers:
                headers.pop("date", None)
                plain_headers.pop("date", None)
            if b"X-Request-Id" not in request:
                assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", headers.pop("x-request-id"))
                plain_headers.pop("x-request-id")
            assert (status, headers, body) == (plain_status, plain_headers, plain_body), request
            fast_count -= answered(fast) - before
        assert fast_count == 0, requests


async def test_remembered_answers_say_the_age_and_ttl_of_their_second(make: MakeProxy, bucket: Bucket,
                                                                      clock: FakeClock) -> None:
    """A fast answer is worked out once per entry and request shape; Age and the TTL left are spliced into it per
    response (fasthit._template). They change at different instants (Age at each wall-clock second, the TTL
    left at the fraction of a second the entry was stored at): at each step each answer, made afresh or
    remembered, is what the ordinary path sends at that moment."""
    clock.advance(0.25)  # stored at .25 of a second: the TTL left drops a quarter second after Age grows
    css = bucket.put("site.css", text(5000), ContentType="text/css")
    png = bucket.put("logo.png", bytes(range(256)) * 12, ContentType="image/png")
    fast, plain = await make(True), await make(False)
    for proxy in (fast, plain):
        await ready(proxy, {"site.css": css, "logo.png": png})
    requests = [get("/docs/site.css"), get("/docs/site.css", "Accept-Encoding: br"),
                get("/docs/site.css", f"If-None-Match: {css}"), get("/docs/logo.png")]
    seen = set()
    for step in (0.0, 0.5, 0.2, 0.1, 0.5, 7.125, 0.75, 40.0):
        clock.advance(step)
        for request in requests:
            before = answered(fast)
            for _ in range(2):  # the first may work the answer out; the second is the remembered one
                [(status, headers, body)] = await exchange(fast, [request])
                [(plain_status, plain_headers, plain_body)] = await exchange(plain, [request])
                headers.pop("x-request-id")
                plain_headers.pop("x-request-id")
                assert (status, headers, body) == (plain_status, plain_headers, plain_body), (request, clock.now)
                seen.add((int(headers["age"]), headers["cache-status"].rpartition("=")[2]))
            assert answered(fast) - before == 2, request
    # (Age, TTL left) at .25, .75, .95, 1.05, 1.55, 8.675, 9.425 and 49.425 s after the store, with a TTL of 60
    assert sorted(seen) == [(0, "59"), (0, "60"), (1, "58"), (1, "59"), (8, "51"), (9, "50"), (49, "10")]


async def test_pipelined_answers_stay_in_order(make: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    """A cold key between hot ones: it goes to aiohttp, and so does everything behind it in the same read, so
    the hot answers cannot overtake the miss."""
    hot = text(4000, "h")
    cold = text(2000, "c")
    bucket.put("cold.html", cold, ContentType="text/html")
    proxy = await make(True)
    await ready(proxy, {"hot.css": bucket.put("hot.css", hot, ContentType="text/css")})
    before = answered(proxy)
    replies = await exchange(proxy, [get("/docs/hot.css"), get("/docs/cold.html"), get("/docs/hot.css"),
                                     get("/docs/hot.css", method="HEAD"), get("/docs/hot.css", "X-Request-Id: last")])
    assert [(s.split()[1], h["x-cache"], b) for s, h, b in replies] == [
        ("200", "HIT", hot), ("200", "MISS", cold), ("200", "HIT", hot), ("200", "HIT", b""), ("200", "HIT", hot)]
    assert replies[4][1]["x-request-id"] == "last"
    # The first hot one was answered here; the rest of that read, queued behind the miss, by aiohttp (the
    # kernel may deliver the write in more than one read, which can only let more go to aiohttp).
    assert answered(proxy) - before == 1
    assert shim.log.count(("GET", "cold.html")) == 1


async def test_fast_answers_count_and_log_like_the_ordinary_path(make: MakeProxy, bucket: Bucket) -> None:
    etag = bucket.put("site.css", text(5000), ContentType="text/css")
    logged: dict[bool, list[str]] = {}
    deltas: dict[bool, dict[str, int]] = {}
    for fast in (True, False):
        lines = Lines()
        logger = logging.getLogger(f"test.fasthit.{fast}")
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        proxy = await make(fast, access_log=logger)
        await ready(proxy, {"site.css": etag})
        counters = proxy.app[COUNTERS]
        names = ("hits", "bytes_served", "bytes_br", "bytes_saved")
        before = {name: counters.get(name) for name in names}
        lines.lines.clear()
        replies = await exchange(proxy, [get("/docs/site.css", "Accept-Encoding: br", "User-Agent: probe/1",
                                             "X-Request-Id: abc-1"), get("/docs/site.css", f"If-None-Match: {etag}")])
        await until(lambda lines=lines: len(lines.lines) == 2, "two access log lines")
        logger.removeHandler(lines)
        assert [r[0] for r in replies] == ["HTTP/1.1 200 OK", "HTTP/1.1 304 Not Modified"]
        deltas[fast] = {name: counters.get(name) - before[name] for name in names}
        logged[fast] = [re.sub(r'"(time|ms)":[^,]*,|,"id":"[^"]*"', "", line) for line in lines.lines]
        if fast:
            assert answered(proxy) >= 2
            assert '"id":"abc-1"' in lines.lines[0]
    assert deltas[True] == deltas[False] and deltas[True]["hits"] == 2 and deltas[True]["bytes_br"] > 0
    assert logged[True] == logged[False]
    assert '"status":200,"bytes":' in logged[True][0] and '"cache":"HIT"' in logged[True][0]
    assert '"ua":"probe/1"' in logged[True][0]


async def test_a_client_that_does_not_read_stops_the_writing(make: MakeProxy, bucket: Bucket) -> None:
    """2,000 pipelined hits of 30 KB from a client that reads nothing: the fast path stops writing once its
    connection has unsent bytes, and aiohttp's own flow control takes over (it waits to drain, then stops
    reading), so the proxy holds a bounded amount of memory for it, not 60 MB. Then every answer arrives."""
    body = text(30_000, "p")
    proxy = await make(True)
    await ready(proxy, {"page.html": bucket.put("page.html", body, ContentType="text/html")})
    assert proxy.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 20)
    count = 2000
    before = answered(proxy)
    writer.write(get("/docs/page.html") * count)
    connections = proxy.server.runner.server.connections
    await until(lambda: any(h._buffer_paused for h in connections), "the proxy stops reading from the client")
    buffered = max(h.transport.get_write_buffer_size() for h in connections if h.transport is not None)
    assert buffered < 1 << 20, buffered
    for _ in range(count):
        _, _, got = await read_response(reader)
        assert got == body
    writer.close()
    assert answered(proxy) - before > 0  # the fast path took part until the client fell behind


async def test_header_blocks_are_kept_for_their_second_only(make: MakeProxy, bucket: Bucket,
                                                            clock: FakeClock) -> None:
    """A header block is remembered per headers object, and those are new every second (Age is in them): the
    blocks of an earlier second are dropped when a block is made in a new one, instead of accumulating up to
    the bound over minutes (benchmarks/results/footprint.md, "Third round: growth")."""
    keys = {f"p{i}.png": bucket.put(f"p{i}.png", bytes(range(256)) * 4 + bytes([i]), ContentType="image/png")
            for i in range(3)}
    fast = await make(True)
    await ready(fast, keys)
    blocks = fast.app[FAST_HITS]._blocks
    for key in keys:
        for status, _, _ in await exchange(fast, [get(f"/docs/{key}", "Accept-Encoding: gzip")] * 2):
            assert status == "HTTP/1.1 200 OK"
    assert len(blocks) >= 2
    clock.advance(1.0)
    before = answered(fast)
    later = "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT"  # a new request shape: its answer is worked out
    [(status, _, _)] = await exchange(fast, [get("/docs/p0.png", later)])
    assert (status, answered(fast) - before) == ("HTTP/1.1 304 Not Modified", 1)
    assert len(blocks) == 1  # this second's only


async def test_answers_go_when_the_entries_they_were_made_for_go(make: MakeProxy, bucket: Bucket) -> None:
    """A write anywhere makes this worker drop its in-memory entries (hot.Stamp), and with them the answers made
    for them: each would be worked out again anyway, and kept they held a stale entry and head each."""
    keys = {f"p{i}.png": bucket.put(f"p{i}.png", bytes(range(256)) * 4 + bytes([i]), ContentType="image/png")
            for i in range(3)}
    fast = await make(True)
    await ready(fast, keys)
    answers = fast.app[FAST_HITS]._answers
    before = answered(fast)
    for key in keys:
        await exchange(fast, [get(f"/docs/{key}")] * 2)
    assert answered(fast) - before == 6
    assert len(answers) >= 3
    bucket.put("new.png", bytes(300), ContentType="image/png")
    [(status, headers, _)] = await exchange(fast, [get("/docs/new.png")])
    assert (status, headers["x-cache"]) == ("HTTP/1.1 200 OK", "MISS")
    await fast.app[SITES]["docs"].service.settle()  # committed: the stamp has changed
    before = answered(fast)
    [(status, _, _)] = await exchange(fast, [get("/docs/p0.png")])  # its lookup finds the change
    assert (status, answered(fast) - before) == ("HTTP/1.1 200 OK", 0)  # read again from the index
    assert len(answers) == 0
    for _ in range(2):
        [(status, _, _)] = await exchange(fast, [get("/docs/p0.png")])
    assert (status, answered(fast) - before, len(answers)) == ("HTTP/1.1 200 OK", 2, 1)  # answered here again


async def test_paths_tried_here_and_answered_by_the_ordinary_path_once_are_not_remembered(
        make: MakeProxy, bucket: Bucket) -> None:
    """The fast path looks at a path before the ordinary path does: that look is not a second request for it,
    so a stream of one-off paths (404s, cold fills) leaves the path memo as it was (admission.py)."""
    fast = await make(True)
    hitpath._memo_request_key.cache_clear()
    run = uuid.uuid4().hex  # the table of paths seen is the process's: paths no other test asked for
    for i in range(50):
        [(status, _, _)] = await exchange(fast, [get(f"/docs/{run}/{i}.html")])
        assert status == "HTTP/1.1 404 Not Found"
    assert hitpath._memo_request_key.cache_info().currsize == 0
    bucket.put("again.png", bytes(300), ContentType="image/png")
    for _ in range(3):
        [(status, _, _)] = await exchange(fast, [get("/docs/again.png")])
    assert (status, hitpath._memo_request_key.cache_info().currsize) == ("HTTP/1.1 200 OK", 1)

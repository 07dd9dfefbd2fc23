"""Request forms and malformed requests against the real `cachingproxy serve`, on both HTTP parsers (issue 17, 4-6).

What aiohttp does with a bad request line or header depends on its parser (the C one, or the pure-Python one
with AIOHTTP_NO_EXTENSIONS=1), and its answer to a request it refuses is built before any of our code runs; so
these tests send raw bytes to the served process and read its log, rather than to an in-process test server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from cachingproxy.app import create_app, server_kwargs
from cachingproxy.config import parse_config
from cachingproxy.logsetup import MaskSecrets
from cachingproxy.requestforms import BAD_REQUEST_BODY

from .conftest import Bucket, FakeClock, MakeProxy, free_port, raw_request
from .shim import Shim

PREFIX = "site/"
TOKEN = "tok" + secrets.token_hex(12)  # never a substring of anything else in a log or a response
SECRET = b"outside-the-prefix"


@dataclass
class Served:
    port: int
    proc: asyncio.subprocess.Process
    drain: asyncio.Task[bytes]

    async def log(self) -> str:
        """Stop the process (its log is flushed at exit) and return everything it wrote."""
        if self.proc.returncode is None:
            self.proc.terminate()
        await asyncio.wait_for(self.proc.wait(), 20)
        return (await self.drain).decode(errors="replace")


@pytest.fixture(params=["C", "pure-Python"])
async def served(request: pytest.FixtureRequest, tmp_path: Path, shim: Shim, bucket: Bucket) -> AsyncIterator[Served]:
    """`cachingproxy serve` with aiohttp's C parser or AIOHTTP_NO_EXTENSIONS=1, the admin API on, one worker."""
    port = free_port()
    (tmp_path / "config.toml").write_text(
        f'[server]\nport = {port}\nmount = "/docs"\nworkers = 1\nkeepalive_timeout = 2.0\nlingering_time = 0.5\n'
        f'[s3]\nbucket = "{bucket.name}"\nprefix = "{PREFIX}"\nendpoint_url = "{shim.url}"\n'
        f'addressing_style = "path"\nmax_attempts = 1\n'
        f'[cache]\ndirectory = "{tmp_path / "cache"}"\n'
        f'[admin]\nallowed_hosts = ["proxy.example"]\n')
    env = dict(os.environ, CACHINGPROXY_ADMIN_TOKEN=TOKEN)
    if request.param == "pure-Python":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    else:
        env.pop("AIOHTTP_NO_EXTENSIONS", None)
    check = "import aiohttp.http_parser as p; print(p.HttpRequestParser is p.HttpRequestParserPy)"
    pure = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", check], env=env, capture_output=True,
                                   text=True, check=True)
    assert pure.stdout.strip() == str(request.param == "pure-Python")  # the parser under test really is in use
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cachingproxy", "serve", "--config", str(tmp_path / "config.toml"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            while b"serving http://" not in (line := await proc.stdout.readline()):
                assert line, "the proxy exited before serving"
        served = Served(port, proc, asyncio.create_task(proc.stdout.read()))
        yield served
        assert proc.returncode in (None, 0), "the proxy process died"
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)


async def exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Write `data` as is and read until the server closes (b"<<OPEN>>" appended if it does not within `wait`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        try:
            async with asyncio.timeout(wait):
                while chunk := await reader.read(65536):
                    out += chunk
        except TimeoutError:
            out += b"<<OPEN>>"
        except ConnectionResetError:
            out += b"<<RESET>>"
        return out
    finally:
        writer.close()


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"^HTTP/\d\.\d (\d{3}) ", raw, re.MULTILINE)]


def body_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[2]


# -- item 4: secrets in malformed requests ------------------------------------------------------------------

T = TOKEN.encode()
HEAD = b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n"
# The token in every header position and malformed form the two parsers refuse: values with control bytes,
# header names that are not tokens, lines without a colon, folded lines, framing headers, the request line's
# method, target and version, and lines over the size limits.
MALFORMED = {
    **{f"{name} value {ctl!r}": HEAD + name + b": Bearer " + T + ctl + b"\r\n\r\n"
       for name in (b"Authorization", b"Proxy-Authorization", b"Cookie", b"X-Api-Key")
       for ctl in (b"\x7f", b"\x00", b"\x01")},
    "cookie value with CR": HEAD + b"Cookie: s=" + T + b"\rX: y\r\n\r\n",
    "value before a bare LF line": HEAD + b"Authorization: Bearer " + T + b"\r\nX\n\r\n",
    "token as a header name": HEAD + T + b"\x01: y\r\n\r\n",
    "space in header name": HEAD + b"X " + T + b": y\r\n\r\n",
    "no colon": HEAD + b"Bearer " + T + b"\r\n\r\n",
    "obs-fold continuation": HEAD + b"Authorization: Bearer\r\n " + T + b"\r\n\r\n",
    "space before colon": HEAD + b"Authorization : Bearer " + T + b"\r\n\r\n",
    "token in Content-Length": HEAD + b"Content-Length: " + T + b"\r\n\r\n",
    "token in Transfer-Encoding": HEAD + b"Transfer-Encoding: chunked, " + T + b"\r\n\r\n0\r\n\r\n",
    "token as a chunk size": HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + T + b"\r\nx\r\n0\r\n\r\n",
    "token in Host with NUL": b"GET /docs/a.txt HTTP/1.1\r\nHost: " + T + b"\x00\r\n\r\n",
    "token in the method": T + b"\x01 /docs/a.txt HTTP/1.1\r\nHost: x\r\n\r\n",
    "token in the path": b"GET /docs/" + T + b"\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
    "token in the query": b"GET /docs/a.txt?t=" + T + b"\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "token in the version": b"GET /docs/a.txt HTTP/" + T + b"\r\nHost: x\r\n\r\n",
    "token in an overlong line": b"GET /docs/" + b"a" * 9000 + T + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "token in an overlong header": HEAD + b"Authorization: Bearer " + b"b" * 9000 + T + b"\r\n\r\n",
    "token after an overlong header": HEAD + b"X: " + b"b" * 9000 + b"\r\nAuthorization: Bearer " + T + b"\r\n\r\n",
    "token in a second, malformed request": (
        b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n\r\nGET /docs/a.txt HTTP/1.1\r\nAuthorization: Bearer " + T
        + b"\x7f\r\n\r\n"),
}
# Well-formed requests that carry the token where the log could pick it up.
WELL_FORMED = {
    "token in a path": b"GET /docs/" + T + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "token in the userinfo of an absolute-form target":
        b"GET http://admin:" + T + b"@proxy.example/docs/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "token in a query": b"GET /_admin/stats?token=" + T + b" HTTP/1.1\r\nHost: proxy.example\r\n"
                        b"Connection: close\r\n\r\n",
    "token as a wrong bearer": b"GET /_admin/stats HTTP/1.1\r\nHost: proxy.example\r\nAuthorization: Bearer "
                               + T + b"x\r\nConnection: close\r\n\r\n",
}


async def test_malformed_requests_never_echo_or_log_secrets(served: Served, bucket: Bucket, shim: Shim) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    answers = {}
    for name, data in MALFORMED.items():
        raw = await exchange(served.port, data)
        answers[name] = raw
        got = statuses(raw)
        if raw == b"":
            # The pure-Python parser reads "X\n" as part of a header line still being received: the head never
            # completes, and keepalive_timeout (the head deadline) closes the connection. Nothing echoed either.
            assert name == "value before a bare LF line", name
            continue
        assert got and 400 <= got[-1] < 500, f"{name}: {raw[:300]!r}"
        assert T not in raw and b"Bearer" not in raw and b"\\x" not in raw, f"{name}: {raw[:300]!r}"
        assert b"<<OPEN>>" not in raw, name  # answered, then closed: nothing after it is read as a request
        if got[-1] == 400:
            # aiohttp's own 400 (its parser refused the bytes): one fixed line, whatever the bytes were.
            assert body_of(raw).endswith(BAD_REQUEST_BODY.encode()), f"{name}: {raw[:300]!r}"
    for name, data in WELL_FORMED.items():
        raw = await exchange(served.port, data)
        assert statuses(raw) and T not in raw, f"{name}: {raw[:300]!r}"
    raw = await exchange(served.port, b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(raw) == [200] and raw.endswith(b"hello")  # still serving

    log = await served.log()
    assert TOKEN not in log, [line for line in log.splitlines() if TOKEN in line]
    assert "Bearer" not in log and "\\x" not in log and "Traceback" not in log, log[-3000:]
    assert "http://***@proxy.example/docs/a.txt" in log and "/docs/***" in log  # the well-formed ones, masked
    refused = re.findall(r"malformed request from 127\.0\.0\.1: ([A-Za-z]+) \(answered 400 and closed\)", log)
    # One line per refused request (aiohttp logs a bad method on a connection's first request at DEBUG only).
    assert len(refused) >= len(MALFORMED) - 2, (len(refused), log[-3000:])
    assert set(refused) <= {"BadHttpMessage", "BadHttpMethod", "BadStatusLine", "InvalidHeader", "InvalidURLError",
                            "LineTooLong", "TransferEncodingError", "ContentLengthError"}, set(refused)


# -- items 5 and 6: request forms ----------------------------------------------------------------------------

async def test_request_forms(served: Served, bucket: Bucket, shim: Shim) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    bucket.put(PREFIX + "big.txt", b"0123456789")
    bucket.put(PREFIX + "guides/index.html", b"<p>guides</p>")
    bucket.put("secret.txt", SECRET)
    port = served.port

    async def get(target: bytes, *headers: bytes, method: bytes = b"GET", host: bytes = b"x") -> bytes:
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host, b"Connection: close", *headers]
        return await exchange(port, b"\r\n".join(lines) + b"\r\n\r\n")

    # Item 5: absolute-form is served exactly like origin-form (RFC 9112 §3.2.2), refusals included.
    for path in (b"/docs/a.txt", b"/docs/a.txt?v=1", b"/docs/guides", b"/docs/guides/", b"/docs/missing",
                 b"/docs/%2e%2e/secret.txt", b"/docs//secret.txt", b"/docs", b"/docs/guides%2f"):
        origin = await get(path)
        for scheme in (b"http", b"HTTPS"):
            absolute = await get(scheme + b"://elsewhere.example:8080" + path)
            assert statuses(absolute) == statuses(origin), (path, absolute[:200], origin[:200])
            assert body_of(absolute) == body_of(origin), path
            assert re.findall(rb"Location: ([^\r]*)", absolute) == re.findall(rb"Location: ([^\r]*)", origin)
            assert SECRET not in absolute
    bucket.put(PREFIX + "cold.txt", b"cold")
    assert body_of(await get(b"http://x/docs/cold.txt")) == b"cold"  # a miss, counted as one (log, below)
    assert body_of(await get(b"http://x/docs/a.txt")) == b"hello"
    assert statuses(await get(b"http://x/docs/a.txt", method=b"HEAD")) == [200]
    # ...and its authority replaces Host for routing: the admin API answers only Host "proxy.example".
    bearer = b"Authorization: Bearer " + TOKEN.encode()
    assert statuses(await get(b"http://proxy.example/_admin/stats", bearer, host=b"evil.example")) == [200]
    assert statuses(await get(b"http://evil.example/_admin/stats", bearer, host=b"proxy.example")) == [403]
    for bad in (b"http://user:pw@x/docs/a.txt", b"ftp://x/docs/a.txt", b"http:///docs/a.txt", b"x:80"):
        raw = await get(bad)
        assert statuses(raw) == [400] and b"hello" not in raw, (bad, raw[:200])

    # CONNECT (authority-form) and the asterisk-form; nothing pipelined behind them is read.
    follow = b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    for line, status in ((b"CONNECT evil.example:443 HTTP/1.1", 405), (b"OPTIONS * HTTP/1.1", 405),
                         (b"GET * HTTP/1.1", 400), (b"CONNECT /docs/a.txt HTTP/1.1", 405)):
        raw = await exchange(port, line + b"\r\nHost: evil.example\r\n\r\n" + follow)
        assert statuses(raw) == [status], (line, raw[:300])
        assert b"hello" not in raw and b"<<OPEN>>" not in raw, line
        if status == 405:
            assert b"Allow: GET,HEAD" in raw

    # Item 6: an HTTP/0.9 request line (no version) is refused and the connection closed.
    for data in (b"GET /docs/a.txt\r\n\r\n", b"GET /docs/a.txt\r\nHost: x\r\n\r\n"):
        raw = await exchange(port, data)
        assert statuses(raw) == [400] and b"hello" not in raw and b"<<OPEN>>" not in raw, raw[:300]

    # Two Range header fields: both ignored (RFC 9110 §14.2), on a miss and on a hit; one is still honoured.
    for _ in ("MISS", "HIT"):
        raw = await get(b"/docs/big.txt", b"Range: bytes=0-1", b"Range: bytes=5-6")
        assert statuses(raw) == [200] and body_of(raw) == b"0123456789", raw[:300]
        assert b"Content-Range" not in raw
    raw = await get(b"/docs/big.txt", b"Range: bytes=5-6")
    assert statuses(raw) == [206] and body_of(raw) == b"56"

    # An encoded slash: sent to the canonical spelling, so the index page's relative links resolve.
    for target, location in ((b"/docs/guides%2f", b"/docs/guides/"), (b"/docs/guides%2F?x=1", b"/docs/guides/?x=1"),
                             (b"/docs/guides%2findex.html", b"/docs/guides/index.html")):
        raw = await get(target)
        assert statuses(raw) == [301] and f"Location: {location.decode()}\r\n".encode() in raw, raw[:300]
    assert not [key for _, key in shim.log if not key.startswith(PREFIX)]
    log = await served.log()
    assert "Traceback" not in log, log[-3000:]
    # The access log tells the absolute-form miss as it would the origin-form one: bytes sent, the S3 GET.
    assert re.search(r'"path":"http://x/docs/cold.txt","status":200,"bytes":4,"cache":"MISS","ms":[0-9.]+,'
                     r'"s3":\{"GET":1\}', log), [line for line in log.splitlines() if "cold.txt" in line]


async def test_encoded_slash_is_handled_the_same_everywhere(make_proxy: MakeProxy, bucket: Bucket) -> None:
    """`%2f` after a directory name, inside a path and next to `..`: redirect to the canonical path, or 400."""
    bucket.put(PREFIX + "guides/index.html", b"<p>guides</p>")
    bucket.put(PREFIX + "guides/a.html", b"<p>a</p>")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    for target, expected in (("/docs/guides%2f", (301, "/docs/guides/")), ("/docs/guides%2Fa.html",
                             (301, "/docs/guides/a.html")), ("/docs/nothing%2fhere", (301, "/docs/nothing/here")),
                             ("/docs/guides%2f..%2fa.html", (400, None)), ("/docs/%2fguides", (400, None))):
        status, headers, _ = await raw_request(proxy, target)
        assert (status, headers.get("location")) == expected, target
    status, _, body = await raw_request(proxy, "/docs/guides/a.html")
    assert (status, body) == (200, b"<p>a</p>")


@pytest.mark.parametrize(("line", "expected"), [
    pytest.param(f"path /docs/{TOKEN}/x", "path /docs/***/x", id="the-token-anywhere"),
    pytest.param("b'Authorization: Bearer abc.def'", "b'Authorization: ***'", id="authorization-value"),
    pytest.param("proxy-authorization=Basic eHk6eg==", "proxy-authorization=***", id="proxy-authorization"),
    pytest.param("Cookie: a=1; session=s3cr3t", "Cookie: ***", id="cookie-whole-value"),
    pytest.param('{"authorization":"Bearer x","n":1}', '{"authorization":"***","n":1}', id="json-quoted"),
    pytest.param("GET https://u:pw@h.example/docs/x", "GET https://***@h.example/docs/x", id="url-userinfo"),
    pytest.param('{"path":"/docs/a.txt","status":200}', '{"path":"/docs/a.txt","status":200}', id="untouched"),
])
def test_log_lines_are_masked(line: str, expected: str) -> None:
    """logsetup.MaskSecrets, on the output handler of `cachingproxy serve`: whatever a logger was given."""
    record = logging.LogRecord("any", logging.INFO, __file__, 1, "%s", (line,), None)
    assert MaskSecrets((TOKEN, "")).filter(record) and record.getMessage() == expected


async def test_absolute_form_authority_picks_the_site(aiohttp_client: Any, tmp_path: Path, shim: Shim,
                                                      bucket: Bucket, clock: FakeClock) -> None:
    """Item 5 with [[sites]]: the target's authority, not the Host header, decides which site answers."""
    bucket.put("a/page.txt", b"site a")
    bucket.put("b/page.txt", b"site b")
    s3 = {"bucket": bucket.name, "endpoint_url": shim.url, "addressing_style": "path", "max_attempts": 1}
    config = parse_config({"s3": s3, "cache": {"directory": str(tmp_path / "cache")},
                           "sites": [{"name": "a", "hosts": ["a.example"], "s3": {"prefix": "a/"}},
                                     {"name": "b", "hosts": ["b.example"], "s3": {"prefix": "b/"}}]}, "test")
    server = TestServer(create_app(config, clock=clock))
    await server.start_server(**server_kwargs(config))
    client = await aiohttp_client(server)
    assert client.port is not None
    for target, host, expected in ((b"http://a.example/page.txt", b"b.example", b"site a"),
                                   (b"http://B.example:8080/page.txt", b"a.example", b"site b"),
                                   (b"/page.txt", b"b.example", b"site b"),
                                   (b"http://nowhere.example/page.txt", b"a.example", b"Not Found: no site")):
        raw = await exchange(client.port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host
                             + b"\r\nConnection: close\r\n\r\n")
        assert body_of(raw).startswith(expected), (target, raw[:300])

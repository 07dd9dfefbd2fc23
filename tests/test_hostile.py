"""Hostile input over real sockets: traversal, open redirects, injection, poisoning, limits, smuggling, slowloris.

Rows 27-34 and 36 of docs/reliability.md §6. Requests that a client library would normalise go out on raw sockets,
byte for byte. The bucket holds a secret outside `[s3] prefix` in every test that could reach one, and the shim's
log proves which keys S3 was asked for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import socket
import subprocess
import sys
import time
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestServer

from cachingproxy.app import create_app, server_kwargs

from .conftest import (
    DEADLINE,
    Bucket,
    FakeClock,
    MakeProxy,
    ProxyClient,
    config_for,
    free_port,
    raw_request,
    service_of,
    store_of,
    until,
)
from .shim import Fault, Shim

PREFIX = "site/"
SECRET = b"TOP-SECRET-outside-the-prefix"


def _seed(bucket: Bucket) -> None:
    bucket.put("secret.txt", SECRET)  # bucket root: outside PREFIX
    bucket.put("sitex/secret.txt", SECRET)  # shares PREFIX's characters but not its "/"
    bucket.put(PREFIX + "a.txt", b"hello")
    bucket.put(PREFIX + "guides/index.html", b"<p>guides</p>")
    bucket.put(PREFIX + "evil.example/index.html", b"<p>a directory named like a host</p>")


async def exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Write `data` as is and read until the server closes (or `wait` runs out: then b"<<OPEN>>" is appended)."""
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
    return [int(m) for m in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", raw, re.MULTILINE)]


# -- paths: traversal and prefix escape (row 27) ---------------------------------------------------------------

TRAVERSAL = (
    "/docs/../secret.txt",
    "/docs/../../secret.txt",
    "/docs/%2e%2e/secret.txt",
    "/docs/%2E%2E/secret.txt",
    "/docs/.%2e/secret.txt",
    "/docs/%2e./secret.txt",
    "/docs/a.txt/../../secret.txt",
    "/docs/..%2fsecret.txt",
    "/docs/..%2Fsecret.txt",
    "/docs/guides%2f..%2f..%2fsecret.txt",
    "/docs/%2fsecret.txt",
    "/docs/%2F%2Fsecret.txt",
    "/docs//secret.txt",
    "/docs///secret.txt",
    "/docs/./a.txt",
    "/docs/%2e/a.txt",
    "/docs/..\\secret.txt",
    "/docs/\\secret.txt",
    "/docs/..%5csecret.txt",
    "/docs/%5c..%5csecret.txt",
    "/docs/%5C%5Csecret.txt",
    "/docs/a.txt%00",
    "/docs/a.txt%00.html",
    "/docs/%00/../secret.txt",
    "/docs/%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 for "."
    "/docs/%c0%afsecret.txt",  # overlong UTF-8 for "/"
    "/docs/%e0%80%ae%e0%80%ae/secret.txt",
    "/docs/%ff%fe",
    "/docs/%ed%a0%80",  # a UTF-16 surrogate, invalid in UTF-8
    "/docs/%",
    "/docs/%2",
    "/docs/%zz",
    "/docs/a%2",
    "/docs/%%32%65%%32%65/secret.txt",
    "/docs/%252e%252e/secret.txt",  # decoded once: a literal key "site/%2e%2e/secret.txt"
    "/docs/%252e%252e%252fsecret.txt",
    "/docs/a%0d%0aX-Injected:%201",
    "/docs/a%0aX-Injected:%201",
    "/docs/a%09b",
    "/docs/a%7f",
    "/docs/../site/a.txt",
    "/docs/..;/secret.txt",  # Tomcat-style path parameter
    "/docs;/../secret.txt",
    "/docs/%u002e%u002e/secret.txt",  # IIS %u encoding
    "/docs/" + "a/" * 600 + "x",  # a key over S3's 1024-byte limit
    "/docs/" + "%2e%2e/" * 200 + "secret.txt",
    "/docs/?/../../secret.txt",
    "/docs/#/../secret.txt",
    "/secret.txt",
    "/docsecret.txt",
    "/DOCS/a.txt",
    "//docs/../secret.txt",
    "/./docs/a.txt",
    "/docs/a.txt?x=../../secret.txt",  # a query never reaches the key
)


async def test_traversal_corpus_stays_inside_the_prefix(make_proxy: MakeProxy, bucket: Bucket, shim: Shim,
                                                       tmp_path: Path) -> None:
    _seed(bucket)
    proxy = await make_proxy(s3={"prefix": PREFIX})
    answers = {}
    for target in TRAVERSAL:
        status, headers, body = await raw_request(proxy, target)
        answers[target] = status
        assert status in (200, 301, 400, 404), f"{target}: {status}"
        assert SECRET not in body, target
        assert "x-injected" not in headers, target
        if status == 200:
            assert body == b"hello", target  # the only object these can honestly name
    # The ones that must be refused outright, not merely missed (single decode + segment rules, keys.py).
    for target in ("/docs/%2e%2e/secret.txt", "/docs/..%2fsecret.txt", "/docs//secret.txt", "/docs/..\\secret.txt",
                   "/docs/a.txt%00", "/docs/%c0%ae%c0%ae/secret.txt", "/docs/%zz", "/docs/" + "a/" * 600 + "x"):
        assert answers[target] == 400, target
    # The literal "%2e%2e" key (double-encoded input, decoded once) was looked up inside the prefix and missed.
    assert answers["/docs/%252e%252e/secret.txt"] == 404
    assert answers["/docs/a.txt?x=../../secret.txt"] == 200
    assert shim.log, "the corpus must reach S3 at least once, or the next assertion proves nothing"
    assert all(key.startswith(PREFIX) for _, key in shim.log), [k for _, k in shim.log if not k.startswith(PREFIX)]
    # Keys never become file names: everything the proxy wrote is under the cache directory.
    assert {p.name for p in await asyncio.to_thread(lambda: list(tmp_path.iterdir()))} == {"cache"}
    status, _, _ = await raw_request(proxy, "/docs/a.txt")
    assert status == 200


async def test_unicode_keys_are_not_normalised(make_proxy: MakeProxy, bucket: Bucket) -> None:
    nfc = unicodedata.normalize("NFC", "café.txt")
    nfd = unicodedata.normalize("NFD", "café.txt")
    assert nfc != nfd
    bucket.put(PREFIX + nfc, b"nfc")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    resp = await proxy.get("/docs/" + nfc)
    assert (resp.status, await resp.read()) == (200, b"nfc")
    resp = await proxy.get("/docs/" + nfd)  # a different S3 key: S3 does not normalise either
    assert resp.status == 404


# -- the dir -> dir/ redirect (row 28) -------------------------------------------------------------------------

REDIRECT_PROBES = (
    "{m}/evil.example",
    "{m}//evil.example",
    "{m}///evil.example",
    "{m}/%2F%2Fevil.example",
    "{m}/%2f/evil.example",
    "{m}/\\evil.example",
    "{m}/%5Cevil.example",
    "{m}/%5C%5Cevil.example",
    "{m}/\\/evil.example",
    "{m}/%09/evil.example",
    "{m}/evil.example?next=//evil.example",
    "{m}/evil.example?%0d%0aSet-Cookie:%20a=1",
    "{m}/evil.example?a=\"><script>",
    "{m}/guides?x=1&y=%2F%2Fevil.example",
    "{m}/guides#//evil.example",
    "{m}/guides%3F//evil.example",
    "{m}/guides%23//evil.example",
    "{m}/@evil.example",
    "{m}/evil.example%2F",
    "{m}/https:%2F%2Fevil.example",
)


@pytest.mark.parametrize("mount", ["/docs", "/"])
async def test_redirect_never_leaves_this_host(make_proxy: MakeProxy, bucket: Bucket, mount: str) -> None:
    _seed(bucket)
    bucket.put(PREFIX + "@evil.example/index.html", b"at")
    bucket.put(PREFIX + "https:/evil.example/index.html", b"scheme")
    proxy = await make_proxy(s3={"prefix": PREFIX}, server={"mount": mount})
    m = mount.rstrip("/")
    redirects = 0
    for probe in REDIRECT_PROBES:
        target = probe.format(m=m)
        status, headers, _ = await raw_request(proxy, target, headers={"X-Forwarded-Host": "evil.example"})
        assert status in (200, 301, 400, 404), f"{target}: {status}"  # 200: "%2F" named the directory
        if status != 301:
            continue
        redirects += 1
        location = headers["location"]
        parts = urlsplit(location)
        # Browsers read "\" as "/" (WHATWG URL), so "/\evil" would be protocol-relative too.
        assert parts.scheme == "" and parts.netloc == "", f"{target} -> {location}"
        assert location.startswith("/") and not location.startswith("//") and "\\" not in location, location
        assert not re.search(r"[\x00-\x20\x7f-\uffff]", location), location
        assert "set-cookie" not in headers
    assert redirects >= 5  # the probes that name a real directory really were redirected


async def test_redirect_location_keeps_the_encoded_path(make_proxy: MakeProxy, bucket: Bucket) -> None:
    bucket.put(PREFIX + "a b/ü/index.html", b"x")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    status, headers, _ = await raw_request(proxy, "/docs/a%20b/%C3%BC?q=1")
    assert status == 301 and headers["location"] == "/docs/a%20b/%C3%BC/?q=1"


# -- header injection and reflection (row 29) ----------------------------------------------------------------

async def test_object_metadata_is_not_reflected(make_proxy: MakeProxy, bucket: Bucket) -> None:
    # (x-amz-website-redirect-location is not metadata but a redirect S3 website hosting would follow too:
    # tests/test_sites.py covers it.)
    bucket.put(PREFIX + "m.html", b"<p>m</p>", ContentType="text/html", Metadata={"owner": "eve", "x-set": "1"},
               ContentDisposition='inline; filename="m.html"', Tagging="secret=1")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    for state in ("MISS", "HIT"):
        for method in ("GET", "HEAD"):
            resp = await proxy.request(method, "/docs/m.html")
            await resp.read()
            assert resp.status == 200
            names = {name.lower() for name in resp.headers}
            assert not {n for n in names if n.startswith("x-amz")}, names
            assert "location" not in names and "set-cookie" not in names
            assert resp.headers["Content-Disposition"] == 'inline; filename="m.html"'  # whitelisted
            assert resp.headers["X-Cache"] == state or method == "HEAD"
        await service_of(proxy).settle()


@pytest.mark.parametrize("etag", ['"abc\x01def"', '"\x7f"', '"a\tb"'])
async def test_control_characters_from_s3_never_become_a_500(make_proxy: MakeProxy, bucket: Bucket, shim: Shim,
                                                            etag: str) -> None:
    bucket.put(PREFIX + "c.txt", b"ctl")
    shim.fault = Fault(etag=etag)
    proxy = await make_proxy(s3={"prefix": PREFIX})
    for _ in range(2):
        status, headers, _ = await raw_request(proxy, "/docs/c.txt")
        assert status in (200, 502), status
        assert all(not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", v) for v in headers.values()), headers


async def test_request_bytes_do_not_forge_log_lines(aiohttp_client: AiohttpClient, tmp_path: Path, shim: Shim,
                                                    bucket: Bucket, clock: FakeClock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    config = config_for(tmp_path, shim.url, bucket.name, s3={"prefix": PREFIX})
    caplog.set_level(logging.INFO, logger="hostile.access")
    server = TestServer(create_app(config, clock=clock))
    await server.start_server(**server_kwargs(config),
                              access_log=logging.getLogger("hostile.access"))
    proxy = cast(ProxyClient, await aiohttp_client(server))  # see conftest.make_proxy
    for target in ("/docs/a%0d%0aforged%20200", "/docs/a.txt%0aGET%20/forged", "/docs/a.txt"):
        await raw_request(proxy, target)
    lines = [r.getMessage() for r in caplog.records if r.name == "hostile.access"]
    assert len(lines) == 3 and all("\n" not in line and "\r" not in line for line in lines), lines
    assert "%0d%0a" in lines[0].lower()


# -- cache poisoning and unkeyed input (row 33) -------------------------------------------------------------

async def test_request_headers_cannot_poison_the_cache(make_proxy: MakeProxy, bucket: Bucket, shim: Shim,
                                                       clock: FakeClock) -> None:
    body = bytes(range(256)) * 40
    etag = bucket.put(PREFIX + "p.bin", body)
    proxy = await make_proxy(s3={"prefix": PREFIX})
    hostile = {
        "Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-For": "10.6.6.6",
        "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/evil", "X-Original-URL": "/docs/../secret.txt",
        "X-Rewrite-URL": "/secret.txt", "X-HTTP-Method-Override": "DELETE", "Forwarded": "host=evil.example",
        "Accept-Encoding": "gzip, br", "Cookie": "session=attacker", "Authorization": "Bearer attacker",
        "Range": "bytes=0-9", "If-None-Match": '"stale"', "If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT",
        "Cache-Control": "no-store", "Pragma": "no-cache", "X-Amz-Security-Token": "attacker", "Origin": "x",
    }
    resp = await proxy.get("/docs/p.bin", headers=hostile)
    assert resp.status == 206 and await resp.read() == body[:10]
    await service_of(proxy).settle()
    # What S3 saw: no client header at all, and no Range: the fill is the whole object.
    for sent in shim.headers:
        lowered = {k.lower(): v for k, v in sent.items()}
        assert "range" not in lowered and not any(k.startswith("if-") for k in lowered), lowered
        assert lowered.get("authorization", "").startswith("AWS4-HMAC-SHA256"), lowered
        assert not {"cookie", "x-forwarded-host", "forwarded", "x-amz-security-token"} & set(lowered)
        assert "evil" not in " ".join(lowered.values())
    entry = await store_of(proxy).lookup(PREFIX + "p.bin")
    assert entry is not None and entry.meta.etag == etag and entry.meta.size == len(body)
    # Every kind of client now gets the same full, correct object from the cache.
    reference = None
    for headers in ({}, {"Accept-Encoding": "identity"}, {"Host": "other"}, {"Cookie": "a=b"},
                    {"Authorization": "Basic eDp5"}, {"X-Forwarded-Host": "evil.example"}):
        resp = await proxy.get("/docs/p.bin", headers=headers)
        got = (resp.status, await resp.read(), resp.headers["ETag"], resp.headers["Content-Type"],
               resp.headers["X-Cache"], resp.headers.get("Content-Encoding"), resp.headers.get("Vary"),
               resp.headers.get("Set-Cookie"))
        assert got[:5] == (200, body, etag, "binary/octet-stream", "HIT"), headers
        assert "evil" not in str(resp.headers) and "attacker" not in str(resp.headers)
        reference = reference or got
        assert got == reference, headers
    # Revalidation is not steered by the client either: one HeadObject, then the same full body.
    clock.advance(61)
    shim.reset_counts()
    resp = await proxy.get("/docs/p.bin", headers={"If-None-Match": '"x"', "Range": "bytes=5-"})
    assert resp.status == 206 and await resp.read() == body[5:]
    assert dict(shim.counts) == {"HEAD": 1} and "range" not in {k.lower() for k in shim.headers[0]}


# -- limits (row 30) and the body policy (row 31) ------------------------------------------------------------

async def test_oversize_request_line_and_headers_are_refused(make_proxy: MakeProxy, bucket: Bucket,
                                                             shim: Shim) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    port = proxy.port
    assert port is not None
    probes = {
        "long line": f"GET /docs/{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "long header": f"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\nX-Big: {'b' * 9000}\r\n\r\n".encode(),
        "long header name": f"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n{'N' * 9000}: v\r\n\r\n".encode(),
        "200 headers": ("GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n"
                        + "".join(f"X-H{i}: v\r\n" for i in range(200)) + "\r\n").encode(),
        "1 MB of headers": ("GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n"
                            + "".join(f"X-H{i}: {'v' * 8000}\r\n" for i in range(128)) + "\r\n").encode(),
    }
    for name, data in probes.items():
        raw = await exchange(port, data)
        got = statuses(raw)
        assert got and 400 <= got[0] < 500, f"{name}: {raw[:200]!r}"
        assert len(got) == 1 and b"<<OPEN>>" not in raw, name  # answered once, then closed
        assert b"Traceback" not in raw
    assert shim.counts["GET"] == 0  # none of them got as far as S3
    status, _, body = await raw_request(proxy, "/docs/a.txt")
    assert (status, body) == (200, b"hello")


async def test_limits_come_from_config(make_proxy: MakeProxy, bucket: Bucket) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    proxy = await make_proxy(s3={"prefix": PREFIX}, server={"max_line_size": 100, "max_headers": 4})
    assert proxy.port is not None
    ok = await exchange(proxy.port, b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(ok) == [200]
    long = await exchange(proxy.port, f"GET /docs/{'a' * 120} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert statuses(long)[0] in (400, 414)
    many = await exchange(proxy.port, b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n" + b"X: 1\r\n" * 5 + b"\r\n")
    assert statuses(many)[0] in (400, 431)


METHODS = ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "MKCOL", "COPY")


async def test_other_methods_get_405_and_reach_nothing(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    for method in METHODS:
        resp = await proxy.request(method, "/docs/a.txt", data=b"payload" if method in ("POST", "PUT") else None,
                                   headers={"Cookie": "a=b"})
        assert resp.status == 405, method
        assert resp.headers["Allow"] == "GET, HEAD", method
        assert "Cookie" not in await resp.text()  # TRACE must not echo the request (XST)
    assert shim.counts == {}


@pytest.mark.parametrize(("line", "expected"), [
    pytest.param(b"FOO /docs/a.txt HTTP/1.1", {400}, id="method-the-parser-refuses"),
    pytest.param(b"CONNECT evil.example:443 HTTP/1.1", {405}, id="connect"),
    pytest.param(b"OPTIONS * HTTP/1.1", {405}, id="asterisk-form"),
    # RFC 9112 §3.2.2: served like the origin form, with the target's authority as the Host.
    pytest.param(b"GET http://evil.example/docs/a.txt HTTP/1.1", {200}, id="absolute-form"),
])
async def test_odd_request_lines_are_refused_and_reach_nothing_else(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, line: bytes, expected: set[int]) -> None:
    _seed(bucket)
    proxy = await make_proxy(s3={"prefix": PREFIX})
    assert proxy.port is not None
    raw = await exchange(proxy.port, line + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    got = statuses(raw)
    assert len(got) == 1 and got[0] in expected, (line, raw[:120])
    assert got[0] != 200 or raw.endswith(b"hello")
    assert SECRET not in raw
    assert all(entry == ("GET", PREFIX + "a.txt") for entry in shim.log), shim.log


BODIES = {
    "content-length": b"Content-Length: 5\r\n\r\nhello",
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "empty chunked": b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("framing", sorted(BODIES))
async def test_get_and_head_with_a_body_are_refused_and_the_connection_closed(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, method: str, framing: str) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    bucket.put(PREFIX + "smuggled.txt", b"smuggled")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    assert proxy.port is not None
    follow = b"GET /docs/smuggled.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = await exchange(proxy.port, f"{method} /docs/a.txt HTTP/1.1\r\nHost: x\r\n".encode()
                         + BODIES[framing] + follow)
    assert statuses(raw) == [400], raw[:300]
    assert b"<<OPEN>>" not in raw and b"smuggled" not in raw
    assert not shim.log  # refused before any S3 call, and the pipelined request was never read
    ok = await exchange(proxy.port, b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
    assert statuses(ok) == [200]  # an explicit empty body is no body


# -- request smuggling on both HTTP parsers (row 32) ----------------------------------------------------------

SMUGGLE = {
    "CL.TE": b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
    "TE.CL": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
    "TE xchunked": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "TE chunked, identity": b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "TE identity, chunked": b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    "TE twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    "TE space before colon": b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "TE tab": b"Transfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    "TE vertical tab": b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "TE obs-fold": b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "TE upper": b"Transfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n",
    "TE quoted": b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n',
    "CL twice, different": b"Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello",
    "CL list": b"Content-Length: 0, 5\r\n\r\nhello",
    "CL plus": b"Content-Length: +5\r\n\r\nhello",
    "CL hex": b"Content-Length: 0x5\r\n\r\nhello",
    "CL negative": b"Content-Length: -1\r\n\r\n",
    "CL space inside": b"Content-Length: 1 0\r\n\r\n0123456789",
    "chunk-ext LF": b"Transfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
    "chunk bare LF": b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
    "chunk size overflow": b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\n",
    "chunk size underscore": b"Transfer-Encoding: chunked\r\n\r\n0_5\r\nhello\r\n0\r\n\r\n",
    "trailer smuggles a header": b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 40\r\n\r\n",
    "bare CR in header": b"X-A: a\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bare LF header line": b"X-A: a\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "NUL in header": b"X-A: a\x00b\r\n\r\n",
    "space in header name": b"X A: b\r\nContent-Length: 5\r\n\r\nhello",
    "header without colon": b"Transfer-Encoding chunked\r\n\r\n0\r\n\r\n",
}


@pytest.fixture(params=["C", "pure-Python"])
async def cli_proxy(request: pytest.FixtureRequest, tmp_path: Path, shim: Shim,
                    bucket: Bucket) -> AsyncIterator[int]:
    """The real `cachingproxy serve` in a subprocess, with aiohttp's C parser or AIOHTTP_NO_EXTENSIONS=1."""
    port = free_port()
    (tmp_path / "config.toml").write_text(
        f'[server]\nport = {port}\nmount = "/docs"\nkeepalive_timeout = 1.0\n'
        f'[s3]\nbucket = "{bucket.name}"\nprefix = "{PREFIX}"\nendpoint_url = "{shim.url}"\n'
        f'addressing_style = "path"\nmax_attempts = 1\n'
        f'[cache]\ndirectory = "{tmp_path / "cache"}"\n')
    env = dict(os.environ)
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
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(20):
            while b"serving http://" not in (line := await proc.stdout.readline()):
                assert line, "the proxy exited before serving"
        drain = asyncio.create_task(proc.stdout.read())  # the log must never fill the pipe and block the child
        yield port
        assert proc.returncode is None, "the proxy process died"
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
        log = await drain if drain is not None else b""
    # Every test on this process sent it hostile bytes; aiohttp answers the malformed ones 400 itself and
    # would log each with a stack trace (logsetup.OneLineBadRequests keeps it to one line).
    assert b"Traceback" not in log, log.decode(errors="replace")[-3000:]


async def test_smuggling_probes(cli_proxy: int, bucket: Bucket, shim: Shim) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    bucket.put(PREFIX + "smuggled.txt", b"smuggled")
    follow = b"GET /docs/smuggled.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    outcomes = {}
    for name, framing in SMUGGLE.items():
        raw = await exchange(cli_proxy, b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n" + framing + follow, wait=5)
        got = statuses(raw)
        outcomes[name] = got
        # One answer, a 4xx, and the connection closed: nothing after the ambiguous framing is ever read.
        assert len(got) == 1 and 400 <= got[0] < 500, f"{name}: {raw[:300]!r}"
        assert b"<<OPEN>>" not in raw, name
        assert b"Traceback" not in raw
    assert ("GET", PREFIX + "smuggled.txt") not in shim.log, outcomes
    # Not even the first request reached S3 (the process's one start-up bucket check lists the prefix).
    assert [entry for entry in shim.log if entry != ("LIST", PREFIX)] == []
    # The process is up and still answers correctly.
    raw = await exchange(cli_proxy, b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(raw) == [200] and raw.endswith(b"hello")


async def test_the_served_process_cuts_slow_clients(cli_proxy: int, bucket: Bucket) -> None:
    """`cachingproxy serve` itself applies [server] limits (server_kwargs), not only the test server."""
    bucket.put(PREFIX + "a.txt", b"hello")
    head = b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 60  # about 20 s at this pace
    sent = [0]
    start = time.monotonic()
    cut, got = await _trickle(cli_proxy, head, 0.05, sent, 0)
    # Cut without an answer by keepalive_timeout = 1.0, long before the head was complete (aiohttp's default
    # would let it finish); the bound is generous for a loaded 2-core box.
    assert got == b"" and sent[0] < len(head), (sent, got[:100])
    assert cut - start <= 1.0 + DEADLINE, cut - start
    raw = await exchange(cli_proxy, b"GET /docs/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(raw) and 400 <= statuses(raw)[0] < 500


@pytest.mark.parametrize("target", ["/docs/a.txt", "/docs/missing.txt", "/docs/%2e%2e/x", "/nowhere"])
async def test_upgrade_is_never_accepted_and_nothing_after_it_is_read(make_proxy: MakeProxy, bucket: Bucket,
                                                                      shim: Shim, target: str) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    bucket.put(PREFIX + "smuggled.txt", b"smuggled")
    proxy = await make_proxy(s3={"prefix": PREFIX})
    assert proxy.port is not None
    for upgrade in (b"websocket", b"h2c", b"TLS/1.2"):
        raw = await exchange(proxy.port, b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                             b"GET /docs/smuggled.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        # Answered as a plain GET (no 101), then closed: the bytes after it never become a request.
        assert len(statuses(raw)) == 1 and statuses(raw)[0] != 101, raw[:300]
        assert b"<<OPEN>>" not in raw and b"smuggled" not in raw
        assert target != "/docs/a.txt" or raw.endswith(b"hello")
    assert ("GET", PREFIX + "smuggled.txt") not in shim.log
    h2 = await exchange(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert statuses(h2) and statuses(h2)[0] == 400


# -- slowloris (row 36) ------------------------------------------------------------------------------------

async def _trickle(port: int, data: bytes, every: float, sent: list[int], i: int) -> tuple[float, bytes]:
    """Send one byte every `every` seconds, counting them in `sent[i]`; return when the server closes:
    (time.monotonic() then, bytes read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        for byte in data:
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            sent[i] += 1
            try:
                got = await asyncio.wait_for(reader.read(1024), every)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            break  # the server answered or closed
        return time.monotonic(), got
    finally:
        writer.close()


async def test_slowloris_is_cut_and_others_are_served(make_proxy: MakeProxy, bucket: Bucket) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    timeout = 2.0
    proxy = await make_proxy(s3={"prefix": PREFIX}, server={"keepalive_timeout": timeout})
    port = proxy.port
    assert port is not None
    runner = proxy.server.runner
    assert runner is not None and runner.server is not None
    server = runner.server
    head = b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Slow-%d: %d\r\n" % (i, i) for i in range(50))
    # 40 clients each sending a header byte every 50 ms (the attack's pace): never a complete request head.
    sent = [0] * 40
    start = time.monotonic()
    slow = [asyncio.create_task(_trickle(port, head, 0.05, sent, i)) for i in range(40)]
    await until(lambda: len(server.connections) >= 40 and min(sent) > 0, "40 slow clients connected and trickling")
    for _ in range(20):
        status, _, body = await raw_request(proxy, "/docs/a.txt")
        assert (status, body) == (200, b"hello")
    served = time.monotonic()
    results = await asyncio.gather(*slow)
    for (cut, got), count in zip(results, sent, strict=True):
        assert got == b"", got[:100]  # closed without an answer
        assert count < len(head)  # cut before finishing, although bytes kept arriving
        # Others were served at once, not after the slow sockets were cut; and the cut came in bounded time
        # (generous: a loaded 2-core box), long before the head would have been complete.
        assert served < cut <= start + timeout + DEADLINE, (served - start, cut - start)
    assert len(server.connections) == 0  # every slow socket is gone: nothing pins the server


# -- clients that stop reading --------------------------------------------------------------------------------


async def _stuck_get(port: int, path: str) -> socket.socket:
    """A GET on a socket with a tiny receive buffer that then reads nothing: the server's sends stall."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def _hang_up(sock: socket.socket, timeout: float) -> bool:
    """Block until the peer closes or resets `sock` (True), or `timeout` passes (False); reads nothing."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(timeout * 1000))


async def _read_to_end(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    try:
        while chunk := await loop.sock_recv(sock, 1 << 20):
            data += chunk
    except ConnectionResetError:
        pass  # an abort: what arrived before it is all there is
    return data


async def test_a_client_that_stops_reading_is_cut_after_send_timeout(
        make_proxy: MakeProxy, bucket: Bucket) -> None:
    body = os.urandom(24 * 1024 * 1024)  # far more than the socket buffers on both sides hold
    bucket.put(PREFIX + "big.bin", body)
    proxy = await make_proxy(s3={"prefix": PREFIX}, server={"send_timeout": 0.5})
    assert proxy.port is not None
    loop = asyncio.get_running_loop()
    for outcome in ("MISS", "HIT"):  # streamed from a fill, then sendfile from the cache file
        start = loop.time()
        sock = await _stuck_get(proxy.port, "/docs/big.bin")
        # Woken by the server's close or reset, without reading a byte (POLLRDHUP, never POLLIN).
        assert await asyncio.to_thread(_hang_up, sock, 10.0)
        assert loop.time() - start >= 0.5  # it waited the whole send_timeout
        got = await _read_to_end(sock)
        sock.close()
        head, _, partial = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and f"X-Cache: {outcome}".encode() in head
        assert 0 < len(partial) < len(body) and body.startswith(partial)  # cut short, never complete-looking
        # The fill went on without its stuck reader: the object is cached whole and served to others.
        await service_of(proxy).settle()
        status, headers, full = await raw_request(proxy, "/docs/big.bin")
        assert (status, headers["x-cache"], full == body) == (200, "HIT", True)


async def test_idle_connection_is_closed_after_a_response(make_proxy: MakeProxy, bucket: Bucket) -> None:
    bucket.put(PREFIX + "a.txt", b"hello")
    keepalive = 0.5
    proxy = await make_proxy(s3={"prefix": PREFIX}, server={"keepalive_timeout": keepalive})
    assert proxy.port is not None
    # Lower bounds are measured from before the connection exists, so load can only lengthen them; the upper
    # bound is the suite's generous DEADLINE, so a loaded box cannot fail the test either.
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /docs/a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        async with asyncio.timeout(DEADLINE):
            while chunk := await reader.read(1024):
                data += chunk
        # Closed after the whole response (the server kept it alive for the timeout first), never instead of it.
        assert statuses(data) == [200] and data.endswith(b"hello")
        assert time.monotonic() - start >= keepalive * 0.8
    finally:
        writer.close()
    # A connection that never sends a byte is cut too.
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(DEADLINE):
            assert await reader.read(1024) == b""
        assert time.monotonic() - start >= keepalive * 0.8
    finally:
        writer.close()


# -- a hard cap on concurrent S3 fetches ------------------------------------------------------------------

async def test_concurrent_s3_fetches_are_capped(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    for i in range(24):
        bucket.put(f"{PREFIX}k{i}.txt", b"%d" % i)
    shim.fault = Fault(blackhole=True)  # S3 holds each GET until the test lets the round go
    proxy = await make_proxy(s3={"prefix": PREFIX, "max_connections": 4, "request_timeout": 20.0,
                                 "read_timeout": 10.0})
    resps = asyncio.gather(*(proxy.get(f"/docs/k{i}.txt") for i in range(24)))
    for _ in range(6):  # 24 fetches through 4 connections: six rounds, each one saturating the pool
        async with asyncio.timeout(DEADLINE):
            await shim.wait_held(4)
        await shim.close_hanging()
    assert [(r.status, await r.read()) for r in await resps] == [(200, b"%d" % i) for i in range(24)]
    assert shim.counts["GET"] == 24
    assert shim.max_in_flight == 4  # saturated, never exceeded


# -- nothing leaks in errors (row 34) -----------------------------------------------------------------------

async def test_error_responses_leak_nothing(make_proxy: MakeProxy, bucket: Bucket, shim: Shim, moto_url: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    _seed(bucket)
    token = "admin-token-" + "z" * 24
    proxy = await make_proxy(s3={"prefix": PREFIX, "breaker_threshold": 0, "request_timeout": 1.0,
                                 "read_timeout": 0.5},
                             admin={"token": token})
    caplog.set_level(logging.DEBUG)
    errors: list[tuple[str, int, str]] = []

    async def collect(target: str, method: str = "GET", headers: dict[str, str] | None = None) -> None:
        status, got_headers, body = await raw_request(proxy, target, method, headers)
        if status >= 400:
            errors.append((target, status, str(got_headers) + body.decode("latin-1")))

    for target in (*TRAVERSAL, "/docs/missing.txt", "/docs/nope/"):
        await collect(target)
    for method in METHODS:
        await collect("/docs/a.txt", method)
    await collect("/_admin/stats", headers={"Authorization": "Bearer wrong"})
    await collect("/_admin/stats", headers={"Authorization": f"Bearer {token}x"})
    for fault in (Fault(status=500, code="InternalError"), Fault(status=503, code="SlowDown"),
                  Fault(status=403, code="ExpiredToken"), Fault(status=403, code="SignatureDoesNotMatch"),
                  Fault(status=400, code="InvalidArgument"), Fault(blackhole=True)):
        shim.fault = fault
        await collect(f"/docs/cold-{len(errors)}.txt")
        await collect(f"/docs/cold-{len(errors)}.txt", "HEAD")
    await shim.close_hanging()
    shim.fault = None
    statuses_seen = {status for _, status, _ in errors}
    assert {400, 404, 405, 502, 504} <= statuses_seen, statuses_seen
    assert 401 in statuses_seen or 403 in statuses_seen
    secrets = (bucket.name, moto_url, shim.url, str(shim.port), "127.0.0.1", "Traceback", "botocore", "aiobotocore",
               "<Error>", "<?xml", "InternalError", "SlowDown", "ExpiredToken", "SignatureDoesNotMatch",
               "RequestId", "AWS4", "testing", token, "site/")
    for target, status, text in errors:
        for secret in secrets:
            assert secret not in text, (target, status, secret, text)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert token not in logged and "Bearer" not in logged
    assert len(errors) >= 60


@pytest.mark.parametrize("cached", [True, False])  # from the cache file, or from a fill as it arrives
async def test_a_reader_who_goes_away_mid_body_leaves_no_traceback(cli_proxy: int, bucket: Bucket,
                                                                   cached: bool) -> None:
    """Readers close tabs and cancel downloads all day: not an error of the proxy's. aiohttp logs any
    exception a handler lets out as "Error handling request" with a traceback; the fixture's check of the
    whole log (no "Traceback") covers these."""
    body = os.urandom(32 * 1024 * 1024)
    bucket.put(PREFIX + "big.bin", body)
    if cached:
        raw = await exchange(cli_proxy, b"GET /docs/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                             wait=30)
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(body[-100:])
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli_proxy)
        writer.write(b"GET /docs/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(256 * 1024)
        writer.close()  # mid-body: the kernel answers the proxy's next bytes with a reset
        await writer.wait_closed()
    # Still serving, and the log (checked when the fixture stops the process) holds no traceback.
    raw = await exchange(cli_proxy, b"GET /docs/big.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n"
                                    b"Connection: close\r\n\r\n", wait=30)
    assert raw.startswith(b"HTTP/1.1 206") and raw.endswith(body[:10])

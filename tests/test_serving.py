"""Serving rules over real sockets: proxy -> shim -> moto."""

from __future__ import annotations

import email.utils
import hashlib
import os

import aiohttp
import pytest

from .conftest import Bucket, MakeProxy, ProxyClient, raw_request, service_of
from .shim import Fault, Shim

OBJECT_HEADERS = {
    "ContentType": "text/html; charset=utf-8",
    "CacheControl": "max-age=60",
    "ContentEncoding": "identity",
    "ContentDisposition": 'inline; filename="page.html"',
    "ContentLanguage": "en",
    "Expires": "Thu, 01 Dec 2033 16:00:00 GMT",
}


async def test_miss_then_hit_serves_object_headers_and_makes_no_s3_request_when_fresh(
        proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    etag = bucket.put("guide/page.html", b"<h1>hi</h1>", Metadata={"secret": "x"}, **OBJECT_HEADERS)
    first = await proxy.get("/docs/guide/page.html")
    assert first.status == 200
    assert await first.read() == b"<h1>hi</h1>"
    assert first.headers["X-Cache"] == "MISS"
    assert shim.counts == {"GET": 1}
    shim.reset_counts()

    second = await proxy.get("/docs/guide/page.html")
    assert await second.read() == b"<h1>hi</h1>"
    assert second.headers["X-Cache"] == "HIT"
    assert second.headers["Cache-Status"] == "cachingproxy; hit; ttl=60"
    assert second.headers["Age"] == "0"
    assert shim.counts == {}
    for resp in (first, second):
        assert resp.headers["ETag"] == etag
        assert resp.headers["Content-Length"] == "11"
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "max-age=60"
        assert resp.headers["Content-Encoding"] == "identity"
        assert resp.headers["Content-Disposition"] == 'inline; filename="page.html"'
        assert resp.headers["Content-Language"] == "en"
        assert resp.headers["Expires"] == "Thu, 01 Dec 2033 16:00:00 GMT"
        assert "Last-Modified" in resp.headers
        # User metadata is never reflected.
        assert not any(h.lower().startswith("x-amz") for h in resp.headers)


async def test_tricky_key_round_trips_exactly(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    bucket.put("guides/a b+c/ü.html", b"tricky")
    resp = await proxy.get("/docs/guides/a%20b%2Bc/%C3%BC.html")
    assert resp.status == 200
    assert await resp.read() == b"tricky"
    assert shim.log == [("GET", "guides/a b+c/ü.html")]
    # "+" is a literal plus, never a space.
    assert (await proxy.get("/docs/guides/a%20b+c/%C3%BC.html")).status == 200
    assert (await proxy.get("/docs/guides/a+b+c/%C3%BC.html")).status == 404


async def test_directory_paths_serve_the_index_document(proxy: ProxyClient, bucket: Bucket) -> None:
    bucket.put("index.html", b"home")
    bucket.put("guides/index.html", b"guides")
    for path, body in [("/docs/", b"home"), ("/docs/guides/", b"guides")]:
        resp = await proxy.get(path, allow_redirects=False)
        assert resp.status == 200, path
        assert await resp.read() == body
    # The bare mount redirects like any folder, so the index page's relative links resolve under it.
    bare = await proxy.get("/docs?x=1", allow_redirects=False)
    assert (bare.status, bare.headers["Location"]) == (301, "/docs/?x=1")


async def test_folder_without_slash_redirects_to_slash_with_query_kept(proxy: ProxyClient, bucket: Bucket) -> None:
    bucket.put("guides/advanced/index.html", b"adv")
    resp = await proxy.get("/docs/guides/advanced?x=1&y=%20", allow_redirects=False)
    assert resp.status == 301
    assert resp.headers["Location"] == "/docs/guides/advanced/?x=1&y=%20"
    followed = await proxy.get("/docs/guides/advanced")
    assert followed.status == 200
    assert await followed.read() == b"adv"


async def test_redirect_location_is_percent_encoded(proxy: ProxyClient, bucket: Bucket) -> None:
    bucket.put("a b/ü/index.html", b"x")
    resp = await proxy.get("/docs/a%20b/%C3%BC", allow_redirects=False)
    assert resp.status == 301
    assert resp.headers["Location"] == "/docs/a%20b/%C3%BC/"


async def test_missing_object_is_404_with_error_document(make_proxy: MakeProxy, bucket: Bucket) -> None:
    bucket.put("404.html", b"<h1>not here</h1>", ContentType="text/html")
    proxy = await make_proxy(cache={"error_document": "404.html"})
    resp = await proxy.get("/docs/nope.html")
    assert resp.status == 404
    assert await resp.read() == b"<h1>not here</h1>"
    assert resp.headers["Content-Type"] == "text/html"
    # A 404 is a 404 (issue 18): none of the error document's validators, its lifetime is negative_ttl.
    assert not {"ETag", "Last-Modified", "Accept-Ranges", "Age", "X-Cache"} & set(resp.headers)
    assert resp.headers["Cache-Control"] == "max-age=10"
    assert resp.headers["Cache-Status"] == "cachingproxy; fwd=uri-miss; fwd-status=404"
    # Client validators and ranges never turn the error page into a 304 or a 206, on a miss or a hit of it.
    head = bucket.client.head_object(Bucket=bucket.name, Key="404.html")
    etag, last_modified = head["ETag"], email.utils.formatdate(head["LastModified"].timestamp(), usegmt=True)
    for headers in ({"If-None-Match": etag}, {"If-None-Match": "*"}, {"If-Modified-Since": last_modified},
                    {"Range": "bytes=0-3"}, {"If-Range": etag, "Range": "bytes=0-3"}):
        for method in ("GET", "HEAD"):
            again = await proxy.request(method, "/docs/nope.html", headers=headers)
            assert again.status == 404, (method, headers)
            assert await again.read() == (b"<h1>not here</h1>" if method == "GET" else b""), headers
            assert "Content-Range" not in again.headers and "ETag" not in again.headers


async def test_plain_404_and_redirects_say_how_long_to_keep_them(make_proxy: MakeProxy, bucket: Bucket) -> None:
    bucket.put("guides/index.html", b"g")
    proxy = await make_proxy(cache={"negative_ttl": 30, "rules": [{"match": "old/**", "client_cache_control":
                                                                   "max-age=3600"}]})
    resp = await proxy.get("/docs/nope.html")
    assert (resp.status, resp.headers["Cache-Control"]) == (404, "max-age=30")
    assert resp.headers["Cache-Status"] == "cachingproxy; fwd=uri-miss; fwd-status=404"
    for path in ("/docs", "/docs/guides"):
        resp = await proxy.get(path, allow_redirects=False)
        assert (resp.status, resp.headers["Cache-Control"]) == (301, "no-store"), path
    bucket.put("old/x/index.html", b"x")
    resp = await proxy.get("/docs/old/x", allow_redirects=False)
    assert (resp.status, resp.headers["Cache-Control"]) == (301, "max-age=3600")


async def test_missing_object_without_error_document_is_plain_404(proxy: ProxyClient, bucket: Bucket) -> None:
    resp = await proxy.get("/docs/nope.html")
    assert resp.status == 404
    assert await resp.text() == "Not Found\n"


async def test_access_denied_on_a_miss_is_404(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    shim.fault = Fault(status=403, code="AccessDenied")
    assert (await proxy.get("/docs/secret.html")).status == 404
    assert (await proxy.head("/docs/secret.html")).status == 404


async def test_expired_credentials_on_a_miss_are_502_not_404(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    shim.fault = Fault(status=403, code="ExpiredToken")
    resp = await proxy.get("/docs/page.html")
    assert resp.status == 502


async def test_other_methods_are_405_with_allow(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        resp = await proxy.request(method, "/docs/x.html")
        assert resp.status == 405, method
        assert resp.headers["Allow"] == "GET, HEAD"
    assert shim.counts == {}


async def test_head_matches_get_headers_without_body(proxy: ProxyClient, bucket: Bucket) -> None:
    bucket.put("p.html", b"0123456789", **OBJECT_HEADERS)
    cold_head = await proxy.head("/docs/p.html")
    get = await proxy.get("/docs/p.html")
    hot_head = await proxy.head("/docs/p.html")
    assert await cold_head.read() == b"" and await hot_head.read() == b""
    names = ("Content-Type", "Content-Length", "ETag", "Last-Modified", "Cache-Control", "Content-Encoding",
             "Content-Disposition", "Content-Language", "Expires", "Accept-Ranges")
    for name in names:
        assert cold_head.headers[name] == get.headers[name] == hot_head.headers[name], name


async def test_client_validators_and_ranges_on_miss_and_hit(proxy: ProxyClient, bucket: Bucket) -> None:
    body = bytes(range(256)) * 4
    etag = bucket.put("r.bin", body)
    for state in ("miss", "hit"):
        path = f"/docs/r.bin?{state}"  # the query never changes the key
        ranged = await proxy.get(path, headers={"Range": "bytes=10-19"})
        assert ranged.status == 206, state
        assert await ranged.read() == body[10:20]
        # A ranged miss answers as soon as its bytes arrive; the whole-object fill goes on behind it.
        await service_of(proxy).settle()
        assert ranged.headers["Content-Range"] == f"bytes 10-19/{len(body)}"
        not_modified = await proxy.get(path, headers={"If-None-Match": etag})
        assert not_modified.status == 304
        assert not_modified.headers["ETag"] == etag
        assert await not_modified.read() == b""
        since = await proxy.get(path, headers={"If-Modified-Since": not_modified.headers["Last-Modified"]})
        assert since.status == 304
        unsatisfiable = await proxy.get(path, headers={"Range": "bytes=5000-"})
        assert unsatisfiable.status == 416
        assert unsatisfiable.headers["Content-Range"] == f"bytes */{len(body)}"
    # The ranged miss stored the whole object, not the range.
    full = await proxy.get("/docs/r.bin")
    assert full.headers["X-Cache"] == "HIT"
    assert await full.read() == body


async def test_50mb_object_is_byte_exact_on_miss_and_hit(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(50 * 1024 * 1024)
    bucket.put("big.bin", body)
    digest = hashlib.md5(body).hexdigest()
    for outcome in ("MISS", "HIT"):
        resp = await proxy.get("/docs/big.bin")
        assert resp.headers["X-Cache"] == outcome
        h = hashlib.md5()
        async for chunk in resp.content.iter_chunked(1 << 20):
            h.update(chunk)
        assert h.hexdigest() == digest
    assert shim.counts == {"GET": 1}


async def test_s3_down_with_nothing_cached_is_502_without_leaks(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    await shim.refuse()
    resp = await proxy.get("/docs/page.html")
    assert resp.status == 502
    text = await resp.text()
    assert len(text) < 100
    for leak in (bucket.name, "127.0.0.1", str(shim.port), "Traceback", "botocore", "<Error>", "testing"):
        assert leak not in text


async def test_s3_too_slow_is_504(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    proxy = await make_proxy(s3={"request_timeout": 0.3})
    shim.fault = Fault(blackhole=True)
    resp = await proxy.get("/docs/page.html")
    assert resp.status == 504
    assert bucket.name not in await resp.text()


async def test_s3_5xx_with_nothing_cached_is_502(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    shim.fault = Fault(status=503, code="SlowDown")
    resp = await proxy.get("/docs/page.html")
    assert resp.status == 502
    assert "SlowDown" not in await resp.text()


async def test_truncated_body_cuts_the_client_and_is_not_cached(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(600_000)
    bucket.put("cut.bin", body)
    shim.fault = Fault(truncate_after=300_000)
    resp = await proxy.get("/docs/cut.bin")
    assert resp.status == 200  # headers were already on their way
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):  # the connection is cut, never a clean end
        async for chunk in resp.content.iter_any():
            got += chunk
    assert len(got) < len(body) and body.startswith(got)
    shim.fault = None
    again = await proxy.get("/docs/cut.bin")
    assert again.headers["X-Cache"] == "MISS"
    assert await again.read() == body
    assert shim.counts["GET"] == 2


async def test_bad_paths_are_refused_before_s3(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    for path in ("/docs/a/../b", "/docs/%2e%2e/x", "/docs/a%5Cb", "/docs/a%00b", "/docs//evil.example",
                 "/docs/%zz", "/docs/%C3%28"):
        status, _, body = await raw_request(proxy, path)
        assert status == 400, path
        assert len(body) < 100
    assert shim.counts == {}


async def test_cold_range_is_answered_before_the_whole_object_arrives(
        proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(4 * 1024 * 1024)
    bucket.put("big.bin", body)
    shim.fault = Fault(stall_after=1024 * 1024)  # S3 sends 1 MiB, then stalls until released
    resp = await proxy.get("/docs/big.bin", headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert await resp.read() == body[100:200]
    assert shim.counts == {"GET": 1}
    shim.release.set()
    await service_of(proxy).settle()
    hit = await proxy.get("/docs/big.bin")
    assert hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == body

"""TTL and revalidation: a fake clock decides freshness, the shim counts what reaches S3."""

from __future__ import annotations

import aiohttp

from .conftest import Bucket, FakeClock, MakeProxy, ProxyClient
from .shim import Fault, Shim


async def warm(proxy: ProxyClient, path: str) -> aiohttp.ClientResponse:
    resp = await proxy.get(path)
    await resp.read()
    return resp


async def test_fresh_hit_makes_no_s3_request(proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"a")
    await warm(proxy, "/docs/a.html")
    shim.reset_counts()
    clock.advance(59)
    resp = await warm(proxy, "/docs/a.html")
    assert resp.headers["X-Cache"] == "HIT"
    assert resp.headers["Age"] == "59"
    assert resp.headers["Cache-Status"] == "cachingproxy; hit; ttl=1"
    assert shim.counts == {}


async def test_expired_unchanged_object_costs_one_head_and_no_get(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"a")
    await warm(proxy, "/docs/a.html")
    shim.reset_counts()
    clock.advance(61)
    resp = await warm(proxy, "/docs/a.html")
    assert resp.headers["X-Cache"] == "REVALIDATED"
    assert resp.headers["Age"] == "0"
    assert await resp.read() == b"a"
    assert shim.counts == {"HEAD": 1}
    # Revalidation restarts the TTL.
    shim.reset_counts()
    again = await warm(proxy, "/docs/a.html")
    assert again.headers["X-Cache"] == "HIT"
    assert shim.counts == {}


async def test_metadata_only_change_shows_after_ttl(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    etag = bucket.put("a.css", b"body{}", ContentType="text/plain", CacheControl="max-age=1")
    await warm(proxy, "/docs/a.css")
    bucket.copy_metadata("a.css", ContentType="text/css", CacheControl="max-age=600")
    clock.advance(61)
    resp = await warm(proxy, "/docs/a.css")
    assert resp.headers["X-Cache"] == "REVALIDATED"
    assert resp.headers["ETag"] == etag
    assert resp.headers["Content-Type"] == "text/css"
    assert resp.headers["Cache-Control"] == "max-age=600"
    # ...and the refreshed headers were stored, not just sent once.
    hit = await warm(proxy, "/docs/a.css")
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["Content-Type"] == "text/css"


async def test_changed_object_is_served_new_after_ttl(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"old")
    await warm(proxy, "/docs/a.html")
    new_etag = bucket.put("a.html", b"new body")
    # Within the TTL the old body is still served: that is the contract.
    assert await (await proxy.get("/docs/a.html")).read() == b"old"
    shim.reset_counts()
    clock.advance(61)
    resp = await proxy.get("/docs/a.html")
    assert await resp.read() == b"new body"
    assert resp.headers["ETag"] == new_etag
    assert resp.headers["Content-Length"] == "8"
    assert shim.counts == {"HEAD": 1, "GET": 1}
    hit = await warm(proxy, "/docs/a.html")
    assert hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == b"new body"


async def test_deleted_object_turns_404_after_ttl(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"a")
    await warm(proxy, "/docs/a.html")
    bucket.delete("a.html")
    assert (await proxy.get("/docs/a.html")).status == 200
    clock.advance(61)
    assert (await proxy.get("/docs/a.html")).status == 404
    # The entry is gone: re-uploading shows the new object once the negative TTL is over.
    bucket.put("a.html", b"back")
    clock.advance(11)
    resp = await proxy.get("/docs/a.html")
    assert resp.headers["X-Cache"] == "MISS"
    assert await resp.read() == b"back"


async def test_head_403_during_revalidation_never_drops_the_entry(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"a")
    await warm(proxy, "/docs/a.html")
    clock.advance(61)
    shim.fault = Fault(status=403)  # a body-less HEAD 403: expired credentials look like this
    resp = await warm(proxy, "/docs/a.html")
    assert resp.status == 200
    assert resp.headers["X-Cache"] == "STALE"
    assert await resp.read() == b"a"
    shim.fault = None
    shim.reset_counts()
    back = await warm(proxy, "/docs/a.html")
    assert back.headers["X-Cache"] == "REVALIDATED"
    assert shim.counts == {"HEAD": 1}


async def test_ttl_rules_match_globs_below_the_prefix(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    proxy = await make_proxy(s3={"prefix": "site/"}, cache={"rules": [{"match": "_static/**", "ttl": 3600},
                                                                      {"match": "*.html", "ttl": 5}]})
    bucket.put("site/_static/css/a.css", b"css")
    bucket.put("site/index.html", b"home")
    bucket.put("site/guides/x.html", b"guide")
    for path in ("/docs/_static/css/a.css", "/docs/", "/docs/guides/x.html"):
        await warm(proxy, path)
    clock.advance(30)
    statuses = {path: (await warm(proxy, path)).headers["X-Cache"]
                for path in ("/docs/_static/css/a.css", "/docs/", "/docs/guides/x.html")}
    # "*.html" does not cross "/", so guides/x.html falls back to the default TTL (60 s).
    assert statuses == {"/docs/_static/css/a.css": "HIT", "/docs/": "REVALIDATED", "/docs/guides/x.html": "HIT"}

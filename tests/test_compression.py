"""Compression over real sockets: variants made once per version, negotiated per request, decoded by the
libraries (brotli, zstandard, gzip), never by our own code."""

from __future__ import annotations

import gzip
import hashlib
from typing import Any

import aiohttp
import brotli
import pytest
import zstandard

from cachingproxy.appkeys import CLOCK, COUNTERS, SITES

from .conftest import Bucket, FakeClock, MakeProxy, ProxyClient, until
from .shim import Shim

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def text(size: int, seed: str = "a") -> bytes:
    """Text that compresses (repeated words) but not to nothing (hex digests)."""
    out = bytearray()
    n = 0
    while len(out) < size:
        out += f".rule-{n} {{ color: #{hashlib.sha256(f'{seed}{n}'.encode()).hexdigest()[:6]}; }}\n".encode()
        n += 1
    return bytes(out[:size])


DECODE = {"br": brotli.decompress, "zstd": lambda b: zstandard.ZstdDecompressor().decompress(b),
          "gzip": gzip.decompress}


async def fetch(proxy: ProxyClient, path: str, **headers: str) -> tuple[int, Any, bytes]:
    """A request whose body is returned as sent: aiohttp's client would otherwise decode it for us."""
    async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as session:
        method = headers.pop("method", "GET")
        async with session.request(method, proxy.make_url(path),
                                   headers={k.replace("_", "-"): v for k, v in headers.items()}) as resp:
            return resp.status, resp.headers, await resp.read()


async def variants_ready(proxy: ProxyClient, key: str, etag: str, codings: int = 3) -> None:
    site = proxy.app[SITES].first
    await until(lambda: len(site.variants.present(key, etag) or ()) == codings, f"variants of {key}")


@pytest.mark.parametrize("size", [20_000, 400_000])  # held in memory; a file sent with sendfile
async def test_each_coding_round_trips_byte_exact(proxy: ProxyClient, bucket: Bucket, shim: Shim, size: int) -> None:
    body = text(size)
    etag = bucket.put("site.css", body, ContentType="text/css")
    status, headers, got = await fetch(proxy, "/docs/site.css", Accept_Encoding="br")
    # The miss is identity (variants come after the body is cached), and says it varies.
    assert (status, got, headers["Vary"], headers["ETag"]) == (200, body, "Accept-Encoding", etag)
    assert "Content-Encoding" not in headers
    await variants_ready(proxy, "site.css", etag)
    counters = proxy.app[COUNTERS]
    for coding in ("br", "zstd", "gzip"):
        before = counters.get(f"bytes_{coding}")
        status, headers, got = await fetch(proxy, "/docs/site.css", Accept_Encoding=coding)
        assert status == 200 and headers["Content-Encoding"] == coding and headers["Vary"] == "Accept-Encoding"
        assert headers["ETag"] == f'"{etag[1:-1]}-{coding}"'
        assert int(headers["Content-Length"]) == len(got) < len(body) // 2
        assert DECODE[coding](got) == body
        assert counters.get(f"bytes_{coding}") - before == len(got)
    assert counters.get("bytes_saved") > 0
    # HEAD shows what GET would send.
    status, head, _ = await fetch(proxy, "/docs/site.css", Accept_Encoding="gzip, br", method="HEAD")
    assert (head["Content-Encoding"], head["ETag"]) == ("br", f'"{etag[1:-1]}-br"')
    assert int(head["Content-Length"]) == len(brotli.compress(body, quality=11, mode=brotli.MODE_TEXT)) or \
        int(head["Content-Length"]) < len(body) // 2
    # Made once per version: S3 was asked once, and no request waits for compression.
    assert shim.counts == {"GET": 1}


async def test_a_worker_holds_in_memory_only_the_codings_clients_asked_for(proxy: ProxyClient,
                                                                             bucket: Bucket) -> None:
    """Variants are made and stored for all three codings, but read into this worker's memory only once a client
    asks for one (issue 16, a smaller footprint): identity-only clients cost no variant bytes at all."""
    body = text(20_000)
    etag = bucket.put("held.css", body, ContentType="text/css")
    assert (await fetch(proxy, "/docs/held.css"))[2] == body
    await variants_ready(proxy, "held.css", etag)
    store = proxy.app[SITES].first.store
    for _ in range(3):
        status, headers, got = await fetch(proxy, "/docs/held.css", Accept_Encoding="identity")
        assert (status, got) == (200, body) and "Content-Encoding" not in headers
    assert {c: store.variant_in_memory("held.css", etag, c) for c in DECODE} == dict.fromkeys(DECODE)
    for _ in range(2):  # the first one is read from the cache file, the second from memory: the same bytes
        status, headers, got = await fetch(proxy, "/docs/held.css", Accept_Encoding="gzip, deflate, br")
        assert (status, headers["Content-Encoding"], brotli.decompress(got)) == (200, "br", body)
    held = {c: store.variant_in_memory("held.css", etag, c) is not None for c in DECODE}
    assert held == {"br": True, "zstd": False, "gzip": False}


async def test_vary_etag_304_and_range_rules(proxy: ProxyClient, bucket: Bucket) -> None:
    body = text(8000)
    etag = bucket.put("a.js", body, ContentType="application/javascript")
    await fetch(proxy, "/docs/a.js")
    await variants_ready(proxy, "a.js", etag)
    br_etag = f'"{etag[1:-1]}-br"'
    # If-None-Match matches the variant's ETag or the object's: a 304 naming what this client would get.
    for held in (br_etag, etag, f'"nope", {br_etag}'):
        status, headers, got = await fetch(proxy, "/docs/a.js", Accept_Encoding="br", If_None_Match=held)
        assert (status, got, headers["ETag"], headers["Vary"]) == (304, b"", br_etag, "Accept-Encoding"), held
    status, headers, _ = await fetch(proxy, "/docs/a.js", If_None_Match=br_etag)
    assert (status, headers["ETag"]) == (304, etag)
    status, headers, got = await fetch(proxy, "/docs/a.js", Accept_Encoding="br", If_None_Match='"other"')
    assert status == 200 and brotli.decompress(got) == body
    # Range: answered from the identity body, under the object's own ETag.
    status, headers, got = await fetch(proxy, "/docs/a.js", Accept_Encoding="br", Range="bytes=10-19")
    assert (status, got, headers["ETag"], headers["Vary"]) == (206, body[10:20], etag, "Accept-Encoding")
    assert "Content-Encoding" not in headers


@pytest.mark.parametrize(("extra", "size", "varies"), [
    ({"ContentType": "image/png"}, 5000, False),  # not a compressible type: no Vary, never compressed
    ({"ContentType": "text/css", "CacheControl": "no-transform"}, 5000, False),  # RFC 9111 §5.2.2.6
    ({"ContentType": "text/css"}, 1000, True),  # under 1 KiB: identity, but still varies
])
async def test_what_is_never_compressed(proxy: ProxyClient, bucket: Bucket, extra: dict[str, str], size: int,
                                        varies: bool) -> None:
    body = text(size)
    etag = bucket.put("x", body, **extra)
    for _ in range(2):
        await fetch(proxy, "/docs/x", Accept_Encoding="br")
    await proxy.app[SITES].first.variants.wait()
    status, headers, got = await fetch(proxy, "/docs/x", Accept_Encoding="br, gzip")
    assert (status, got, headers["ETag"]) == (200, body, etag)
    assert "Content-Encoding" not in headers
    assert ("Vary" in headers) is varies


async def test_compression_can_be_turned_off(make_proxy: MakeProxy, bucket: Bucket) -> None:
    proxy = await make_proxy(compression={"enabled": False})
    body = text(5000)
    bucket.put("c.css", body, ContentType="text/css")
    for _ in range(3):
        status, headers, got = await fetch(proxy, "/docs/c.css", Accept_Encoding="br")
        assert (status, got) == (200, body) and "Vary" not in headers


@pytest.mark.parametrize("size", [30_000, 300_000])
async def test_a_gzip_stored_object_both_ways(proxy: ProxyClient, bucket: Bucket, size: int) -> None:
    plain = text(size)
    stored = gzip.compress(plain)
    etag = bucket.put("pre.html", stored, ContentType="text/html", ContentEncoding="gzip")
    # A client without gzip, first on the miss (decompressed from the fill) and then on hits.
    for _ in range(3):
        status, headers, got = await fetch(proxy, "/docs/pre.html", Accept_Encoding="br")
        assert (status, got, headers["Vary"], headers["ETag"]) == (200, plain, "Accept-Encoding",
                                                                   f'"{etag[1:-1]}-identity"')
        assert "Content-Encoding" not in headers
    status, headers, got = await fetch(proxy, "/docs/pre.html")
    assert got == plain and "Content-Encoding" not in headers
    # A gzip client gets the stored bytes as they are, never recompressed.
    for _ in range(2):
        status, headers, got = await fetch(proxy, "/docs/pre.html", Accept_Encoding="gzip, br")
        assert (status, got, headers["Content-Encoding"], headers["ETag"]) == (200, stored, "gzip", etag)
    assert gzip.decompress(got) == plain
    status, headers, _ = await fetch(proxy, "/docs/pre.html", If_None_Match=f'"{etag[1:-1]}-identity"')
    assert status == 304


async def test_variants_go_with_their_object(make_proxy: MakeProxy, bucket: Bucket, clock: FakeClock) -> None:
    proxy = await make_proxy(admin={"token": TOKEN})
    store = proxy.app[SITES].first.store
    old = text(6000, "old")
    etag = bucket.put("v.css", old, ContentType="text/css")
    await fetch(proxy, "/docs/v.css")
    await variants_ready(proxy, "v.css", etag)
    assert await store.stored_variants("v.css", etag) == {"br", "zstd", "gzip"}
    stats = await (await proxy.get("/_admin/stats", headers=AUTH)).json()
    assert stats["entries"] == 1  # variants are rows in the index, but not objects

    # A new version (a new ETag): the old version's variants leave the index with its body.
    new = text(7000, "new")
    new_etag = bucket.put("v.css", new, ContentType="text/css")
    clock.advance(61)
    status, headers, got = await fetch(proxy, "/docs/v.css", Accept_Encoding="br")
    assert (status, got, headers["ETag"]) == (200, new, new_etag)
    await proxy.app[SITES].first.service.settle()
    await variants_ready(proxy, "v.css", new_etag)
    assert await store.stored_variants("v.css", new_etag) == {"br", "zstd", "gzip"}
    assert await store.stored_variants("v.css", etag) == set()
    status, headers, got = await fetch(proxy, "/docs/v.css", Accept_Encoding="br")
    assert brotli.decompress(got) == new and headers["ETag"] == f'"{new_etag[1:-1]}-br"'

    # A purge takes the variants too.
    resp = await proxy.post("/_admin/purge", json={"key": "v.css"}, headers=AUTH)
    assert resp.status == 200
    assert await store.stored_variants("v.css", new_etag) == set()
    assert (await fetch(proxy, "/docs/v.css", Accept_Encoding="br"))[2] == new  # refetched: identity first


async def test_making_variants_does_not_hold_the_body_of_an_object_fetched_once(
        proxy: ProxyClient, bucket: Bucket) -> None:
    """The variant maker reads the body it compresses, but no client asked for it again: it must not stay in
    this worker's memory (a crawler's one visit per page would fill every worker's hot layer). The next hit
    brings it in, as any first hit does."""
    etag = bucket.put("once.css", text(8000), ContentType="text/css")
    assert (await fetch(proxy, "/docs/once.css"))[0] == 200
    await variants_ready(proxy, "once.css", etag)
    site = proxy.app[SITES].first

    async def held() -> bool:
        entry = await site.store.lookup("once.css")  # brings the entry into memory, if it was not
        assert entry is not None and entry.meta.etag == etag
        return site.store.fresh_in_memory("once.css", float("inf"), proxy.app[CLOCK]()) is not None

    assert not await held()
    assert (await fetch(proxy, "/docs/once.css"))[0] == 200
    assert await held()

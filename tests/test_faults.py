"""Resilience: docs/reliability.md §6 rows 1-14, 16-19, 22-24, injected by the real shim in front of moto.

Each test names its row; the figures it asserts are the ones quoted in the README's reliability table.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cachingproxy.appkeys import STORE

from .conftest import DEADLINE, Bucket, FakeClock, MakeProxy, ProxyClient, service_of, until
from .shim import Fault, Shim

LEAKS = ("Traceback", "botocore", "<Error>", "127.0.0.1", "testing")


async def get(proxy: ProxyClient, path: str, **kw: Any) -> tuple[int, str, bytes]:
    resp = await proxy.get(path, **kw)
    body = await resp.read()
    return resp.status, resp.headers.get("X-Cache", ""), body


@asynccontextmanager
async def unpooled(proxy: ProxyClient) -> AsyncIterator[aiohttp.ClientSession]:
    """A session with no connection limit: the test client's own stops at 100, so "500 concurrent" would not be."""
    async with aiohttp.ClientSession(proxy.make_url(""), connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


async def session_get(session: aiohttp.ClientSession, path: str) -> tuple[int, str, bytes]:
    async with session.get(path) as resp:
        return resp.status, resp.headers.get("X-Cache", ""), await resp.read()


async def warm_pages(proxy: ProxyClient, bucket: Bucket, n: int) -> dict[str, bytes]:
    pages = {f"p{i}.html": os.urandom(1000 + i * 997) for i in range(n)}
    for key, body in pages.items():
        bucket.put(key, body)
    for key in pages:
        assert (await get(proxy, f"/docs/{key}"))[0] == 200
    await service_of(proxy).settle()  # committed: a response may end before its body is indexed
    return pages


async def test_row1_s3_refused_serves_every_warmed_page_stale_then_502_past_the_window(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    proxy = await make_proxy(cache={"stale_if_error": 3600})
    pages = await warm_pages(proxy, bucket, 30)
    await shim.refuse()
    clock.advance(61)
    results = [await get(proxy, f"/docs/{key}") for key in pages]
    assert [(status, outcome) for status, outcome, _ in results] == [(200, "STALE")] * len(pages)
    assert [body for *_, body in results] == list(pages.values())
    clock.advance(3600)  # past ttl + stale_if_error
    status, _, body = await get(proxy, "/docs/p0.html")
    assert status == 502
    assert not any(leak.encode() in body for leak in (*LEAKS, bucket.name))


async def test_row2_blackholed_s3_opens_the_breaker_so_later_requests_do_not_wait(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    proxy = await make_proxy(s3={"request_timeout": 0.2, "breaker_threshold": 2, "breaker_cooldown": 30})
    pages = await warm_pages(proxy, bucket, 10)
    shim.reset_counts()
    shim.fault = Fault(blackhole=True)
    clock.advance(61)
    results = [await get(proxy, f"/docs/{key}") for key in pages]
    assert {(status, outcome) for status, outcome, _ in results} == {(200, "STALE")}
    # Only the two requests before the breaker opened reached S3 (and waited for the deadline).
    assert shim.counts == {"HEAD": 2}
    # After the cooldown one probe goes through; S3 is back, so the breaker closes.
    shim.fault = None
    clock.advance(31)
    assert (await get(proxy, "/docs/p0.html"))[1] == "REVALIDATED"
    assert (await get(proxy, "/docs/p1.html"))[1] == "REVALIDATED"


async def test_row3_slowdown_on_revalidation_serves_stale_with_bounded_retries(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    proxy = await make_proxy(s3={"max_attempts": 2})
    await warm_pages(proxy, bucket, 1)
    shim.reset_counts()
    shim.fault = Fault(status=503, code="SlowDown")
    clock.advance(61)
    status, outcome, _ = await get(proxy, "/docs/p0.html")
    assert (status, outcome) == (200, "STALE")
    assert shim.counts == {"HEAD": 2}  # max_attempts, no more


async def test_row4_cold_keys_while_s3_is_down_answer_502_or_504_without_leaks(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    proxy = await make_proxy(s3={"request_timeout": 0.3, "breaker_threshold": 0})
    shim.fault = Fault(blackhole=True)
    blackholed = [await get(proxy, f"/docs/cold{i}.html") for i in range(3)]
    await shim.refuse()
    refused = [await get(proxy, f"/docs/cold{i}.html") for i in range(3, 6)]
    assert [s for s, _, _ in blackholed] == [504] * 3
    assert [s for s, _, _ in refused] == [502] * 3
    for _, _, body in blackholed + refused:
        assert len(body) < 100
        assert not any(leak.encode() in body for leak in (*LEAKS, bucket.name, "cold"))


async def test_row5_200_concurrent_misses_on_a_slow_s3_make_one_get(
        proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(512 * 1024)
    bucket.put("hot.bin", body)
    shim.fault = Fault(blackhole=True)  # S3 is slow: the GET is held until all 200 requests share it
    async with unpooled(proxy) as session:
        results = asyncio.gather(*(session_get(session, "/docs/hot.bin") for _ in range(200)))
        await until(lambda: service_of(proxy).waiting("hot.bin") == 200, "200 requests sharing the fill")
        async with asyncio.timeout(DEADLINE):
            await shim.wait_held(1)
        await shim.close_hanging()
        got = await results
    assert shim.counts == {"GET": 1}
    assert [(status, outcome) for status, outcome, _ in got] == [(200, "MISS")] * 200
    assert sum(body_ == body for *_, body_ in got) == 200


async def test_row6_500_concurrent_requests_on_an_expired_key_make_one_head(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    await warm_pages(proxy, bucket, 1)
    shim.reset_counts()
    shim.fault = Fault(blackhole=True)  # the HEAD is held until all 500 requests share it
    clock.advance(61)
    async with unpooled(proxy) as session:
        results = asyncio.gather(*(session_get(session, "/docs/p0.html") for _ in range(500)))
        await until(lambda: service_of(proxy).waiting("p0.html") == 500, "500 requests sharing the revalidation")
        async with asyncio.timeout(DEADLINE):
            await shim.wait_held(1)
        await shim.close_hanging()
        got = await results
    assert shim.counts == {"HEAD": 1}
    assert {(status, outcome) for status, outcome, _ in got} == {(200, "REVALIDATED")}


async def test_row7_stale_while_revalidate_serves_at_once_with_one_background_head(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    proxy = await make_proxy(cache={"stale_while_revalidate": 30})
    await warm_pages(proxy, bucket, 1)
    shim.reset_counts()
    shim.arrived.clear()
    shim.fault = Fault(blackhole=True, ops=frozenset({"HEAD"}))  # the HEAD hangs until released
    clock.advance(70)
    # Every request is answered while the revalidation is still hanging at S3.
    results = await asyncio.gather(*(get(proxy, "/docs/p0.html") for _ in range(20)))
    assert {(status, outcome) for status, outcome, _ in results} == {(200, "STALE")}
    # Hits from memory can all be answered before the background HEAD (through botocore) reaches S3.
    await asyncio.wait_for(shim.arrived.wait(), 10)
    assert shim.counts == {"HEAD": 1}
    shim.fault = None
    await shim.close_hanging()
    await service_of(proxy).settle()
    # The background HEAD restarted the TTL; past TTL + window a request waits for S3 again.
    assert (await get(proxy, "/docs/p0.html"))[1] == "HIT"
    clock.advance(60 + 30)
    status, outcome, _ = await get(proxy, "/docs/p0.html")
    assert (status, outcome) == (200, "REVALIDATED")


async def test_row8_a_stalled_client_never_slows_the_others(
        proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(20 * 1024 * 1024)
    bucket.put("big.bin", body)
    shim.fault = Fault(stall_after=1024 * 1024)  # S3 sends 1 MiB, then waits for `release`
    stalled = await proxy.get("/docs/big.bin")  # headers read, body never read
    results = asyncio.gather(*(get(proxy, "/docs/big.bin") for _ in range(10)))
    # The others are on the stalled client's fill before the rest of the body (far more than the stalled
    # socket's buffers hold) arrives.
    await until(lambda: service_of(proxy).waiting("big.bin") == 11, "the stalled client and 10 others on one fill")
    shim.release.set()
    assert all(got == body for *_, got in await results)
    assert shim.counts == {"GET": 1}
    stalled.close()


async def test_row10_clients_aborting_after_headers_leak_no_s3_connections(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    proxy = await make_proxy(s3={"max_connections": 4})
    for i in range(40):
        bucket.put(f"k{i}.bin", os.urandom(300_000))
    aborted = [await proxy.get(f"/docs/k{i}.bin") for i in range(40)]
    for resp in aborted:
        resp.close()
    await service_of(proxy).settle()
    # With a pool of 4, any leaked connection would stall these.
    results = await asyncio.gather(*(get(proxy, f"/docs/k{i}.bin") for i in range(40)))
    assert [status for status, _, _ in results] == [200] * 40


async def test_row11_truncated_bodies_are_never_cached_or_complete_looking(
        proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(400_000)
    bucket.put("cut.bin", body)
    shim.fault = Fault(truncate_after=200_000)
    for _ in range(10):
        resp = await proxy.get("/docs/cut.bin")
        assert resp.status == 200  # headers were already on their way
        with pytest.raises(aiohttp.ClientPayloadError):  # cut short: never a complete-looking body
            await resp.read()
    assert shim.counts == {"GET": 10}  # never served from a cached copy


@pytest.mark.parametrize("checksum", [True, False], ids=["crc32", "md5-only"])
async def test_row12_flipped_bytes_fail_md5_are_not_cached_and_cut_the_client(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, checksum: bool) -> None:
    # With S3's CRC32 header botocore's check catches it (and no MD5 is computed); without, the MD5 of the ETag.
    body = os.urandom(300_000)
    bucket.put("flip.bin", body)
    shim.fault = Fault(flip_byte=True, no_checksum=not checksum)
    for _ in range(5):
        resp = await proxy.get("/docs/flip.bin")
        with pytest.raises(aiohttp.ClientPayloadError):  # cut before the last byte, which waits for the MD5
            await resp.read()
    shim.fault = None
    status, outcome, got = await get(proxy, "/docs/flip.bin")
    assert (status, outcome, got == body) == (200, "MISS", True)
    assert service_of(proxy).counters.get("integrity_failures") == 5


async def test_row13_kms_and_multipart_etags_are_cached_without_false_rejections(
        proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    bucket.put("kms.bin", os.urandom(100_000))
    bucket.put("multi.bin", os.urandom(100_000))
    shim.faults["kms.bin"] = Fault(etag='"0123456789abcdef0123456789abcdef"', sse_kms=True)
    shim.faults["multi.bin"] = Fault(etag='"0123456789abcdef0123456789abcdef-3"')
    for key in ("kms.bin", "multi.bin"):
        assert (await get(proxy, f"/docs/{key}"))[:2] == (200, "MISS")
        assert (await get(proxy, f"/docs/{key}"))[:2] == (200, "HIT")
    assert service_of(proxy).counters.get("integrity_failures") == 0


async def test_row14_object_replaced_between_head_and_get_keeps_etag_and_body_together(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.bin", b"version one")
    await get(proxy, "/docs/a.bin")
    new_etag = bucket.put("a.bin", b"version two!")
    # The HEAD reports a third version that no GET will ever return.
    shim.fault = Fault(etag='"ffffffffffffffffffffffffffffffff"', ops=frozenset({"HEAD"}))
    clock.advance(61)
    resp = await proxy.get("/docs/a.bin")
    body = await resp.read()
    assert body == b"version two!"
    assert resp.headers["ETag"] == new_etag == f'"{hashlib.md5(body).hexdigest()}"'
    hit = await proxy.get("/docs/a.bin")
    assert (hit.headers["ETag"], await hit.read()) == (new_etag, b"version two!")


async def test_row16_damaged_cache_files_are_refetched_with_verify_on_read(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    proxy = await make_proxy(cache={"verify_on_read": True})
    bodies = {f"f{i}.bin": os.urandom(40_000) for i in range(3)}
    for key, body in bodies.items():
        bucket.put(key, body)
        await get(proxy, f"/docs/{key}")
    await service_of(proxy).settle()  # committed: a response may end before its body is indexed
    files = sorted((tmp_path / "cache" / "db").rglob("*.val"))
    assert len(files) == 3
    os.truncate(files[0], 100)  # truncated
    files[1].write_bytes(bytes(40_000))  # zeroed, same size
    damaged = bytearray(files[2].read_bytes())
    damaged[1234] ^= 0x01  # one flipped bit, same size
    files[2].write_bytes(bytes(damaged))
    shim.reset_counts()
    for key, body in bodies.items():
        status, outcome, got = await get(proxy, f"/docs/{key}")
        assert (status, outcome, got == body) == (200, "MISS", True)
    assert shim.counts == {"GET": 3}


async def test_row17_garbage_cache_index_is_moved_aside_and_serving_goes_on(
        make_proxy: MakeProxy, bucket: Bucket, tmp_path: Path) -> None:
    db = tmp_path / "cache" / "db"
    db.mkdir(parents=True)
    (db / "cache.db").write_bytes(os.urandom(8192))
    proxy = await make_proxy()
    bucket.put("a.html", b"a")
    assert await get(proxy, "/docs/a.html") == (200, "MISS", b"a")
    assert await get(proxy, "/docs/a.html") == (200, "HIT", b"a")
    assert [p.name.startswith("db.corrupt-") for p in (tmp_path / "cache").iterdir()].count(True) == 1


async def test_row18_unusable_cache_directory_passes_through_from_s3(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    proxy = await make_proxy(cache={"directory": str(blocker)})
    body = os.urandom(200_000)
    bucket.put("a.bin", body)
    results = [await get(proxy, "/docs/a.bin") for _ in range(5)]
    assert results == [(200, "MISS", body)] * 5
    assert shim.counts == {"GET": 5}


async def test_row19_a_locked_cache_index_degrades_to_misses_not_errors(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    await warm_pages(proxy, bucket, 3)
    # Another process holds the SQLite write lock (diskcache's LRU makes every read a write).
    locker = sqlite3.connect(tmp_path / "cache" / "db" / "cache.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        results = [await get(proxy, f"/docs/p{i}.html") for i in range(3)]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert [status for status, _, _ in results] == [200] * 3
    assert (await get(proxy, "/docs/p0.html"))[:2] == (200, "HIT")


async def test_row22_filling_past_the_size_limit_stays_near_the_limit(
        make_proxy: MakeProxy, bucket: Bucket, tmp_path: Path) -> None:
    proxy = await make_proxy(cache={"size_limit_mb": 1})
    for i in range(30):  # 3 MiB through a 1 MiB cache
        bucket.put(f"k{i}.bin", os.urandom(100 * 1024))
        assert (await get(proxy, f"/docs/k{i}.bin"))[0] == 200
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "db").rglob("*.val"))
    assert on_disk <= 1.2 * 1024 * 1024
    # Every key is still served correctly, evicted or not.
    for i in range(30):
        assert (await get(proxy, f"/docs/k{i}.bin"))[0] == 200


async def test_row23_random_missing_keys_cost_one_s3_call_per_negative_ttl_and_evict_nothing(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock, tmp_path: Path) -> None:
    pages = await warm_pages(proxy, bucket, 5)
    shim.reset_counts()
    missing = [f"/docs/missing/{i}.html" for i in range(300)]
    for _ in range(3):
        assert {(await get(proxy, path))[0] for path in missing} == {404}
    # One GET per key, plus the dir -> dir/ probe (HEAD of missing/i.html/index.html) once each.
    assert shim.counts == {"GET": 300, "HEAD": 300}
    clock.advance(11)
    assert (await get(proxy, missing[0]))[0] == 404
    assert shim.counts["GET"] == 301
    # The expired ones were let go when that one was remembered again: memory holds one TTL's worth of 404s.
    assert sorted(service_of(proxy)._negative) == ["missing/0.html", "missing/0.html/index.html"]
    shim.reset_counts()
    for key in pages:
        assert (await get(proxy, f"/docs/{key}"))[1] == "HIT"


async def test_row24_expired_credentials_never_drop_or_negative_cache_entries(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    pages = await warm_pages(proxy, bucket, 5)
    shim.fault = Fault(status=403, code="ExpiredToken")
    clock.advance(61)
    for key, body in pages.items():
        assert await get(proxy, f"/docs/{key}") == (200, "STALE", body)
    assert (await get(proxy, "/docs/cold.html"))[0] == 502
    shim.fault = None
    shim.reset_counts()
    for key in pages:
        assert (await get(proxy, f"/docs/{key}"))[:2] == (200, "REVALIDATED")
    assert shim.counts == {"HEAD": 5}


async def test_the_last_byte_does_not_wait_for_the_index_and_the_next_request_waits_for_it_to_be_a_hit(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    # fdatasync and the index cost a cold 100 MiB object 0.04-0.05 s: the client does not wait for them
    # (benchmarks/results/cold-large.md); a request arriving meanwhile waits, and is then a hit.
    await warm_pages(proxy, bucket, 1)  # the cache index exists
    body = os.urandom(1_000_000)
    bucket.put("big.bin", body)
    store = proxy.app[STORE]
    locker = sqlite3.connect(tmp_path / "cache" / "db" / "cache.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the body cannot be indexed while this is held
    try:
        async with asyncio.timeout(DEADLINE):
            assert await get(proxy, "/docs/big.bin") == (200, "MISS", body)
        second = asyncio.create_task(get(proxy, "/docs/big.bin"))
        await until(lambda: store.commit_retries >= 1, "the commit met the lock")
        assert not second.done()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert await second == (200, "HIT", body)
    assert shim.counts["GET"] == 2  # p0.html and big.bin, each once


async def test_a_commit_outlasts_a_brief_write_lock_held_by_another_process(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    await warm_pages(proxy, bucket, 1)  # the cache index exists
    bucket.put("new.html", b"new page")
    store = proxy.app[STORE]
    locker = sqlite3.connect(tmp_path / "cache" / "db" / "cache.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        request = asyncio.create_task(get(proxy, "/docs/new.html"))
        # Held until the commit has met the lock and timed out once (one SQLite busy timeout), no longer.
        await until(lambda: store.commit_retries >= 1, "the commit timed out on the lock and is trying again")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert await request == (200, "MISS", b"new page")
    assert await get(proxy, "/docs/new.html") == (200, "HIT", b"new page")
    assert proxy.app[STORE].write_errors == 0
    assert shim.counts["GET"] == 2  # p0.html and new.html, each once

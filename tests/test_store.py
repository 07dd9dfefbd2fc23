"""The store against a real diskcache in tmp_path: damaged files are misses, never served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachingproxy import store as store_module
from cachingproxy.appkeys import STORE
from cachingproxy.models import ObjectMeta
from cachingproxy.store import CacheStore

from .conftest import Bucket, FakeClock, MakeProxy, ProxyClient, service_of
from .shim import Shim


def body_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "db").rglob("*.val")]


async def test_truncated_cache_file_is_refetched_not_served(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    body = os.urandom(100_000)
    bucket.put("a.bin", body)
    assert await (await proxy.get("/docs/a.bin")).read() == body
    await service_of(proxy).settle()  # committed: a response may end before its body is indexed
    [value] = body_files(tmp_path / "cache")
    # Power loss with diskcache (no fsync) can leave a committed row pointing at a short file.
    os.truncate(value, 5000)
    resp = await proxy.get("/docs/a.bin")
    assert resp.headers["X-Cache"] == "MISS"
    assert await resp.read() == body
    assert shim.counts == {"GET": 2}


async def test_zero_byte_object_is_cached(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    bucket.put("empty.txt", b"")
    first = await proxy.get("/docs/empty.txt")
    assert (first.status, await first.read(), first.headers["Content-Length"]) == (200, b"", "0")
    second = await proxy.get("/docs/empty.txt")
    assert (second.headers["X-Cache"], await second.read()) == ("HIT", b"")
    assert shim.counts == {"GET": 1}


async def test_replaced_object_drops_the_old_body(proxy: ProxyClient, bucket: Bucket, clock: FakeClock,
                                                  tmp_path: Path) -> None:
    bucket.put("a.bin", os.urandom(50_000))
    await (await proxy.get("/docs/a.bin")).read()
    bucket.put("a.bin", os.urandom(60_000))
    clock.advance(61)
    await (await proxy.get("/docs/a.bin")).read()
    await service_of(proxy).settle()
    sizes = sorted(p.stat().st_size for p in body_files(tmp_path / "cache"))
    assert sizes == [60_000]


async def test_staging_leftovers_from_a_crash_are_removed_at_start(make_proxy: MakeProxy, tmp_path: Path) -> None:
    staging = tmp_path / "cache" / "staging"
    staging.mkdir(parents=True)
    (staging / "half-written.part").write_bytes(b"x" * 1000)
    await make_proxy()
    assert list(staging.iterdir()) == []


async def test_a_hot_key_is_renewed_once_per_renewal_period(tmp_path: Path) -> None:
    """Every hit is noted, but a key's store time is rewritten at most once per `renew_after`: rewriting
    every hot key at every flush cost 8 % of a worker's CPU under hot hits."""
    store = CacheStore(str(tmp_path), size_limit=2_000_000, touch_interval=0, renew_after=600)
    await store.open()
    try:
        meta = ObjectMeta(etag='"k-1"', size=100_000, last_modified=None)  # above HOT_BODY_MAX: a file
        staging = await store.stage("k", meta)
        await store.write(staging, os.urandom(100_000))
        assert await store.commit(staging, 0.0) is not None
        staging.close()
        for _ in range(5):
            entry = await store.lookup("k")
            assert entry is not None
            handle = await store.open_body(entry)
            assert handle is not None
            handle.close()
            await store._wait_flush()  # each hit's write-back, if it made one, is done before the next hit
        assert store._index.renewed == 1
    finally:
        await store.close()


async def test_a_worker_keeps_its_renewals_only_while_they_save_a_write(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Which keys this worker renewed is only worth remembering for `renew_after` (a key renewed longer ago is
    renewed at its next hit anyway), and never for more than _RENEWED_KEPT keys, oldest dropped first. Before,
    every key stayed until 100,000 of them were held: 14 MiB per worker after a crawler."""
    monkeypatch.setattr(store_module, "_RENEWED_KEPT", 3)
    clock = FakeClock(0.0)
    store = CacheStore(str(tmp_path), size_limit=2_000_000, touch_interval=0, renew_after=600, clock=clock)
    await store.open()

    async def hit(key: str) -> None:
        entry = await store.lookup(key)
        if entry is None:
            meta = ObjectMeta(etag=f'"{key}-1"', size=100_000, last_modified=None)
            staging = await store.stage(key, meta)
            await store.write(staging, os.urandom(100_000))
            assert await store.commit(staging, 0.0) is not None
            staging.close()
            entry = await store.lookup(key)
            assert entry is not None
        handle = await store.open_body(entry)
        assert handle is not None
        await store.close_body(handle)
        await store._wait_flush()

    try:
        await hit("a")
        await hit("b")
        clock.advance(300)
        await hit("c")
        await hit("a")  # renewed 300 s ago: nothing to write yet, and still remembered
        assert list(store._renewed) == ["a", "b", "c"]
        renewed = store._index.renewed
        clock.advance(300)
        await hit("d")  # a and b were renewed 600 s ago: forgotten, as the bound would also have dropped a
        assert list(store._renewed) == ["c", "d"]
        await hit("e")
        await hit("f")  # the bound: c goes first
        assert list(store._renewed) == ["d", "e", "f"]
        await hit("a")  # forgotten, so renewed (a write is what forgetting it costs)
        assert list(store._renewed) == ["e", "f", "a"]
        assert store._index.renewed == renewed + 4
    finally:
        await store.close()


async def test_hits_keep_entries_alive_when_the_cache_evicts(tmp_path: Path) -> None:
    """Eviction is least-recently-used to within the touch interval, while hits stay read-only."""
    store = CacheStore(str(tmp_path), size_limit=2_000_000, touch_interval=0, renew_after=0)
    await store.open()

    async def put(key: str) -> None:
        meta = ObjectMeta(etag=f'"{key}-1"', size=100_000, last_modified=None)
        staging = await store.stage(key, meta)
        await store.write(staging, os.urandom(100_000))
        assert await store.commit(staging, 0.0) is not None
        staging.close()

    async def cached(key: str) -> bool:
        entry = await store.lookup(key)
        handle = None if entry is None else await store.open_body(entry)
        if handle is not None:
            handle.close()
        return handle is not None

    try:
        for i in range(15):
            await put(f"k{i}")
        assert await cached("k0")  # the oldest entry is read, so it becomes the newest
        for i in range(15, 25):
            await put(f"k{i}")
        assert await cached("k0")
        assert not await cached("k1")
    finally:
        await store.close()


async def test_cold_fills_do_not_read_every_key(proxy: ProxyClient, bucket: Bucket, tmp_path: Path) -> None:
    """Making room for a fill needs the cache's volume, one read. It used to take it from stats(), whose
    variant count rescans every key once the row count changes, that is after every commit: each cold fill
    then cost time and memory in proportion to the whole index (47 ms at 12,000 rows; the growth of
    benchmarks/results/footprint.md, "Third round")."""
    bodies = {f"cold/{i}.bin": os.urandom(2000 + i) for i in range(20)}
    for key, body in bodies.items():
        bucket.put(key, body)
    for key, body in bodies.items():
        resp = await proxy.get(f"/docs/{key}")
        assert resp.headers["X-Cache"] == "MISS"
        assert await resp.read() == body
    await service_of(proxy).settle()
    assert len(body_files(tmp_path / "cache")) == len(bodies)  # every fill was staged and committed
    assert proxy.app[STORE]._index.scans == 0
    assert (await proxy.get("/readyz")).status == 200  # S3 reachable: the probe needs no count of entries
    assert proxy.app[STORE]._index.scans == 0

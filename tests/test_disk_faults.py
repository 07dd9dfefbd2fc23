"""The cache directory under fault (issue 17 items 1 and 3): a full disk, and a directory deleted while running.

The full-disk tests put the cache on a 20 MiB tmpfs (they need root to mount one, and skip saying so when
the machine does not allow it). Every request goes over real sockets to moto behind the fault shim.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachingproxy.appkeys import STORE
from cachingproxy.bodies import PASS_THROUGH_WINDOW

from .conftest import Bucket, MakeProxy, ProxyClient, service_of
from .shim import Fault, Shim

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB file system for the cache directory: a tmpfs, which is where ENOSPC really comes from."""
    mount = tmp_path / "cache"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("tmpfs ran: no (mount -t tmpfs needs root here); no fault-injecting fallback is written")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill_up(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the file system, as another tenant of the disk would."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        block = b"\0" * (256 * 1024)
        while shutil.disk_usage(disk).free > leave + len(block):
            out.write(block)
            out.flush()
    return filler


async def _readyz(proxy: ProxyClient) -> tuple[int, dict[str, str]]:
    resp = await proxy.get("/readyz")
    return resp.status, await resp.json()


def _full_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cache disk" in r.getMessage()]


async def test_a_disk_filling_up_mid_body_passes_through_and_says_so(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, small_disk: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cachingproxy.store")
    proxy = await make_proxy(cache={"directory": str(small_disk), "size_limit_mb": 1024})
    bodies = {f"big{i}.bin": os.urandom(12 * MiB) for i in range(2)}
    for key, body in bodies.items():
        bucket.put(key, body)
    # Both fills start with room (a reservation each), then another tenant takes the disk mid-body.
    shim.fault = Fault(stall_after=1 * MiB, ops=frozenset({"GET"}))
    shim.arrived.clear()
    requests = [asyncio.create_task(proxy.get(f"/docs/{key}")) for key in bodies]
    async with asyncio.timeout(10):
        while shim.counts["GET"] < 2:
            shim.arrived.clear()
            await shim.arrived.wait()
    filler = _fill_up(small_disk, leave=1 * MiB)
    shim.release.set()
    for key, task in zip(bodies, requests, strict=True):
        resp = await task
        assert (resp.status, resp.headers["X-Cache"]) == (200, "MISS")
        assert await resp.read() == bodies[key]
    await service_of(proxy).settle()
    assert await _readyz(proxy) == (200, {"status": "ready", "cache": "full", "s3": "ok"})
    assert proxy.app[STORE].write_errors == 2, "each body that could not be cached is counted"
    assert len(_full_lines(caplog)) == 1, "logged once per episode, not once per body"
    assert [p for p in (small_disk / "staging").iterdir()] == []

    # The other tenant leaves: the episode ends, and the next body is cached again.
    shim.fault = None
    filler.unlink()
    bucket.put("small.bin", b"s" * 100_000)
    assert (await (await proxy.get("/docs/small.bin")).read()) == b"s" * 100_000
    assert (await proxy.get("/docs/small.bin")).headers["X-Cache"] == "HIT"
    assert await _readyz(proxy) == (200, {"status": "ready", "cache": "ok", "s3": "ok"})
    assert _full_lines(caplog)[1:] == ["cache disk has room again: caching resumed"]


async def test_a_reader_behind_a_pass_through_window_reads_the_rest_from_s3(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, small_disk: Path) -> None:
    """A body that cannot go to disk keeps only PASS_THROUGH_WINDOW bytes in memory, never the whole
    object; a client slower than S3 by more than that gets the rest in a ranged GET of the same ETag."""
    proxy = await make_proxy(cache={"directory": str(small_disk), "size_limit_mb": 1024})
    body = os.urandom(PASS_THROUGH_WINDOW + 24 * MiB)  # more than the disk: passes through from the start
    etag = bucket.put("huge.bin", body)
    resp = await proxy.get("/docs/huge.bin")  # headers only: the client reads nothing yet
    await service_of(proxy).settle()  # the fill has gone all the way through, far past this reader
    assert await resp.read() == body
    assert shim.log == [("GET", "huge.bin"), ("GET", "huge.bin")]
    ranged = shim.headers[1]
    assert ranged["If-Match"] == etag and ranged["Range"].startswith("bytes=")
    assert ranged["Range"].endswith(f"-{len(body) - 1}")
    assert await _readyz(proxy) == (200, {"status": "ready", "cache": "full", "s3": "ok"})


async def test_room_is_made_for_a_known_length_before_the_disk_runs_out(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, small_disk: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cachingproxy.store")
    proxy = await make_proxy(cache={"directory": str(small_disk), "size_limit_mb": 1024})
    bodies = {f"part{i}.bin": os.urandom(6 * MiB) for i in range(5)}  # 30 MiB through a 20 MiB disk
    for key, body in bodies.items():
        bucket.put(key, body)
        assert await (await proxy.get(f"/docs/{key}")).read() == body
    last = await proxy.get("/docs/part4.bin")
    assert (last.headers["X-Cache"], await last.read()) == ("HIT", bodies["part4.bin"])
    first = await proxy.get("/docs/part0.bin")
    assert (first.headers["X-Cache"], await first.read()) == ("MISS", bodies["part0.bin"])
    assert proxy.app[STORE].write_errors == 0 and _full_lines(caplog) == []
    assert await _readyz(proxy) == (200, {"status": "ready", "cache": "ok", "s3": "ok"})


async def test_an_object_larger_than_the_size_limit_passes_through_uncached(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    proxy = await make_proxy(cache={"size_limit_mb": 1})
    bucket.put("small.bin", b"s" * 100_000)
    await (await proxy.get("/docs/small.bin")).read()
    body = os.urandom(2 * MiB)
    bucket.put("over.bin", body)
    for _ in range(2):
        resp = await proxy.get("/docs/over.bin")
        assert (resp.headers["X-Cache"], await resp.read()) == ("MISS", body)
    assert (await proxy.get("/docs/small.bin")).headers["X-Cache"] == "HIT", "nothing was evicted for it"
    assert shim.counts == {"GET": 3}
    assert proxy.app[STORE].write_errors == 0, "not an error: the configured limit at work"
    assert list((tmp_path / "cache" / "staging").iterdir()) == []


# -- the directory deleted while running ----------------------------------------------------------------


async def test_a_deleted_cache_directory_is_recreated_once_and_caching_goes_on(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cachingproxy.store")
    proxy = await make_proxy(admin={"token": "t0ken"})
    bucket.put("a.bin", os.urandom(100_000))
    bucket.put("b.bin", os.urandom(100_000))
    for key in ("a.bin", "b.bin"):
        await (await proxy.get(f"/docs/{key}")).read()
    await service_of(proxy).settle()  # committed: a response may end before its body is indexed
    cache = tmp_path / "cache"
    for path in list(cache.iterdir()):  # rm -rf cache/*
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert (await proxy.get("/docs/a.bin")).headers["X-Cache"] == "MISS"
    await service_of(proxy).settle()
    assert (await proxy.get("/docs/a.bin")).headers["X-Cache"] == "HIT", "caching works again"
    stats = await (await proxy.get("/_admin/stats", headers={"Authorization": "Bearer t0ken"})).json()
    assert stats["entries"] == 1, "the deleted entries are not counted"
    assert await _readyz(proxy) == (200, {"status": "ready", "cache": "ok", "s3": "ok"})
    vanished = [r.getMessage() for r in caplog.records if "vanished" in r.getMessage()]
    assert len(vanished) == 1
    assert (cache / "staging").is_dir() and (cache / "db" / "cache.db").is_file()


async def test_a_cache_directory_that_cannot_be_recreated_is_reported_failed(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    proxy = await make_proxy()
    body = os.urandom(100_000)
    bucket.put("a.bin", body)
    await (await proxy.get("/docs/a.bin")).read()
    # Committed: a response may end before its body is indexed, and that commit would recreate the directory.
    await service_of(proxy).settle()
    cache = tmp_path / "cache"
    shutil.rmtree(cache)
    cache.write_text("a file where the cache directory was")
    assert await _readyz(proxy) == (200, {"status": "degraded", "cache": "unavailable", "s3": "ok",
                                          "reason": "cache unavailable: serving from S3"})
    resp = await proxy.get("/docs/a.bin")
    assert (resp.status, resp.headers["X-Cache"], await resp.read()) == (200, "MISS", body)

"""Fills shared across worker processes (issue 17 item 2): a worker that finds another filling a key streams
from that fill's staging file as it grows, Ranges included, and S3 sees one GET; if the filling worker dies,
another takes over at once.

Two apps on one cache directory in this process stand for two workers (flock(2) locks conflict between open
file descriptions, so they exclude each other exactly as two processes do); the takeover test kills a real
proxy process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp

from cachingproxy.appkeys import STORE

from .conftest import DEADLINE, Bucket, MakeProxy, free_port, service_of, until
from .shim import Fault, Shim

MiB = 1024 * 1024


async def _first_get(shim: Shim) -> None:
    async with asyncio.timeout(30):
        while shim.counts["GET"] < 1:
            shim.arrived.clear()
            await shim.arrived.wait()


async def test_a_second_worker_streams_from_the_first_workers_fill(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    first, second = await make_proxy(), await make_proxy()
    body = os.urandom(4 * MiB)
    bucket.put("big.bin", body)
    shim.faults["big.bin"] = Fault(stall_after=1 * MiB, ops=frozenset({"GET"}))
    filling = asyncio.create_task(first.get("/docs/big.bin"))
    await _first_get(shim)
    # S3 has sent 1 MiB and stalls: the other worker serves what has arrived, without a GET of its own.
    async with asyncio.timeout(5):
        ranges = await asyncio.gather(*(second.get("/docs/big.bin", headers={"Range": f"bytes={at}-{at + 99}"})
                                         for at in (0, 500_000, 900_000)))
        for at, resp in zip((0, 500_000, 900_000), ranges, strict=True):
            assert (resp.status, await resp.read()) == (206, body[at : at + 100])
    whole = asyncio.create_task(second.get("/docs/big.bin"))
    shim.release.set()
    for task in (filling, whole):
        resp = await task
        assert (resp.status, await resp.read()) == (200, body)
    assert shim.counts == {"GET": 1}
    assert (await second.get("/docs/big.bin")).headers["X-Cache"] == "HIT"


async def test_a_worker_that_dies_mid_fill_is_taken_over_within_a_second(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    follower = await make_proxy()
    body = os.urandom(4 * MiB)
    bucket.put("big.bin", body)
    port = free_port()
    config = tmp_path / "filler.toml"
    config.write_text(f"""
[server]
port = {port}
mount = "/docs"
workers = 1
[s3]
bucket = "{bucket.name}"
endpoint_url = "{shim.url}"
addressing_style = "path"
max_attempts = 1
[cache]
directory = "{tmp_path / 'cache'}"
""")
    filler = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cachingproxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    assert filler.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"serving http://" not in await filler.stdout.readline():
                pass
        drain = asyncio.create_task(filler.stdout.read())
        shim.faults["big.bin"] = Fault(stall_after=1 * MiB, ops=frozenset({"GET"}))
        async with aiohttp.ClientSession() as session:
            doomed = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/docs/big.bin"))
            await _first_get(shim)
            async with asyncio.timeout(5):
                resp = await follower.get("/docs/big.bin", headers={"Range": "bytes=0-99"})
                assert (resp.status, await resp.read()) == (206, body[:100])
            whole = asyncio.create_task(follower.get("/docs/big.bin"))
            shim.faults.clear()
            killed = time.monotonic()
            os.killpg(filler.pid, signal.SIGKILL)
            async with asyncio.timeout(5):
                while shim.counts["GET"] < 2:
                    shim.arrived.clear()
                    await shim.arrived.wait()
            took_over = time.monotonic() - killed
            resp = await whole
            assert (resp.status, await resp.read()) == (200, body)
            doomed.cancel()
        assert took_over < 1.0, f"took over after {took_over:.2f} s"
        assert shim.counts["GET"] == 2 and shim.counts["LIST"] <= 1  # the served process's start-up bucket check
        gets = [headers for (op, _), headers in zip(shim.log, shim.headers, strict=True) if op == "GET"]
        assert gets[-1].get("If-Match") == bucket.client.head_object(
            Bucket=bucket.name, Key="big.bin")["ETag"], "the same version as the bytes already sent"
        assert (await follower.get("/docs/big.bin")).headers["X-Cache"] == "HIT"
        drain.cancel()
    finally:
        shim.release.set()
        if filler.returncode is None:
            os.killpg(filler.pid, signal.SIGKILL)
        await filler.wait()


async def test_a_request_to_another_worker_while_the_filler_commits_waits_and_is_a_hit(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    # The filler's client has its last byte before the body is durable and indexed (filling.py): a request
    # to another worker meanwhile waits for that commit instead of following the finished fill as a miss.
    first, second = await make_proxy(), await make_proxy()
    bucket.put("warm.html", b"warm")
    await (await first.get("/docs/warm.html")).read()  # the cache index exists
    await service_of(first).settle()  # and warm.html is in it: its commit must not meet the lock below
    body = os.urandom(1 * MiB)
    bucket.put("big.bin", body)
    locker = sqlite3.connect(tmp_path / "cache" / "db" / "cache.db", timeout=0.1, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the body cannot be indexed while this is held
    try:
        async with asyncio.timeout(DEADLINE):
            resp = await first.get("/docs/big.bin")
            assert (resp.headers["X-Cache"], await resp.read()) == ("MISS", body)
        other = asyncio.create_task(second.get("/docs/big.bin"))
        await until(lambda: first.app[STORE].commit_retries >= 1, "the commit met the lock")
        assert not other.done()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    resp = await other
    assert (resp.headers["X-Cache"], await resp.read()) == ("HIT", body)
    assert shim.counts["GET"] == 2  # warm.html and big.bin, each once


async def test_a_request_to_another_worker_right_after_a_miss_is_a_hit(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    # The filler indexes the body just after its client's last byte. A request to another worker in that
    # moment must see either the entry or the filler's lock: a commit that ended between its lookup and its
    # look at the lock left neither, and it fetched again (a MISS after a MISS, seen under load).
    first, second = await make_proxy(), await make_proxy()
    keys = [f"page-{i}.html" for i in range(60)]
    for key in keys:
        bucket.put(key, key.encode() * 50)
    outcomes = []
    async with asyncio.timeout(DEADLINE):
        for key in keys:
            resp = await first.get(f"/docs/{key}")
            assert (resp.headers["X-Cache"], await resp.read()) == ("MISS", key.encode() * 50)
            resp = await second.get(f"/docs/{key}")
            assert await resp.read() == key.encode() * 50
            outcomes.append(resp.headers["X-Cache"])
    assert outcomes == ["HIT"] * len(keys)
    assert shim.counts["GET"] == len(keys)

"""Single-flight: concurrent misses share one GetObject, concurrent revalidations share one HeadObject."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from .conftest import Bucket, FakeClock
from .shim import Fault, Shim

Client = Any


async def fetch(proxy: Client, path: str) -> tuple[str, bytes]:
    resp = await proxy.get(path)
    return resp.headers["X-Cache"], await resp.read()


async def test_20_concurrent_misses_make_one_get(proxy: Client, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(3 * 1024 * 1024)
    bucket.put("big.bin", body)
    shim.fault = Fault(delay=0.2)  # keep the fill open while all twenty arrive
    results = await asyncio.gather(*(fetch(proxy, "/docs/big.bin") for _ in range(20)))
    assert shim.counts == {"GET": 1}
    assert all(got == body for _, got in results)
    assert {outcome for outcome, _ in results} == {"MISS"}


async def test_concurrent_revalidations_make_one_head(
        proxy: Client, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"a")
    await fetch(proxy, "/docs/a.html")
    clock.advance(61)
    shim.reset_counts()
    shim.fault = Fault(delay=0.2)
    results = await asyncio.gather(*(fetch(proxy, "/docs/a.html") for _ in range(50)))
    assert shim.counts == {"HEAD": 1}
    assert {outcome for outcome, _ in results} == {"REVALIDATED"}
    assert all(body == b"a" for _, body in results)


async def test_leader_disconnect_does_not_break_the_other_waiters(
        proxy: Client, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(2 * 1024 * 1024)
    bucket.put("big.bin", body)
    shim.fault = Fault(delay=0.2)
    leader = await asyncio.wait_for(proxy.get("/docs/big.bin"), 5)  # headers arrive once S3 answers
    followers = [asyncio.create_task(fetch(proxy, "/docs/big.bin")) for _ in range(5)]
    leader.close()  # the first client goes away mid-body
    results = await asyncio.gather(*followers)
    assert all(got == body for _, got in results)
    assert shim.counts == {"GET": 1}
    hit = await fetch(proxy, "/docs/big.bin")
    assert hit == ("HIT", body)
    assert hashlib.md5(hit[1]).hexdigest() == hashlib.md5(body).hexdigest()

"""Single-flight: concurrent misses share one GetObject, concurrent revalidations share one HeadObject.

S3 is held at the shim until every request is seen sharing the one S3 call (CachingProxy.waiting), so
"concurrent" is a fact the test establishes, not a hope that a delay was long enough.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from .conftest import DEADLINE, Bucket, FakeClock, ProxyClient, service_of, until
from .shim import Fault, Shim


async def fetch(proxy: ProxyClient, path: str) -> tuple[str, bytes]:
    resp = await proxy.get(path)
    return resp.headers["X-Cache"], await resp.read()


async def test_20_concurrent_misses_make_one_get(proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(3 * 1024 * 1024)
    bucket.put("big.bin", body)
    shim.fault = Fault(blackhole=True)  # the GET waits at the shim until all twenty share it
    results = asyncio.gather(*(fetch(proxy, "/docs/big.bin") for _ in range(20)))
    async with asyncio.timeout(DEADLINE):
        await shim.wait_held(1)
    await until(lambda: service_of(proxy).waiting("big.bin") == 20, "20 requests sharing the fill")
    await shim.close_hanging()
    got = await results
    assert shim.counts == {"GET": 1}
    assert all(body_ == body for _, body_ in got)
    assert {outcome for outcome, _ in got} == {"MISS"}


async def test_concurrent_revalidations_make_one_head(
        proxy: ProxyClient, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"a")
    await fetch(proxy, "/docs/a.html")
    clock.advance(61)
    shim.reset_counts()
    shim.fault = Fault(blackhole=True)  # the HEAD waits at the shim until all fifty share it
    results = asyncio.gather(*(fetch(proxy, "/docs/a.html") for _ in range(50)))
    await until(lambda: service_of(proxy).waiting("a.html") == 50, "50 requests sharing the revalidation")
    async with asyncio.timeout(DEADLINE):
        await shim.wait_held(1)  # and their one HEAD has reached S3
    await shim.close_hanging()
    got = await results
    assert shim.counts == {"HEAD": 1}
    assert {outcome for outcome, _ in got} == {"REVALIDATED"}
    assert all(body == b"a" for _, body in got)


async def test_leader_disconnect_does_not_break_the_other_waiters(
        proxy: ProxyClient, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(2 * 1024 * 1024)
    bucket.put("big.bin", body)
    shim.fault = Fault(stall_after=512 * 1024)  # S3 sends a quarter of the body, then waits for `release`
    leader = await asyncio.wait_for(proxy.get("/docs/big.bin"), DEADLINE)  # headers arrive once S3 answers
    followers = [asyncio.create_task(fetch(proxy, "/docs/big.bin")) for _ in range(5)]
    await until(lambda: service_of(proxy).waiting("big.bin") == 6, "the leader and 5 followers on one fill")
    leader.close()  # the first client goes away mid-body, while the others wait on the same fill
    shim.release.set()
    results = await asyncio.gather(*followers)
    assert all(got == body for _, got in results)
    assert shim.counts == {"GET": 1}
    hit = await fetch(proxy, "/docs/big.bin")
    assert hit == ("HIT", body)
    assert hashlib.md5(hit[1]).hexdigest() == hashlib.md5(body).hexdigest()

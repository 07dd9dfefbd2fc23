"""Regression guard for aiohttp 3.14's pooled keep-alive connections (aio-libs/aiohttp#12795, #12953, #13000).

Those bugs made the next request on an idle pooled connection fail at once with a read timeout. The
pinned aiohttp/aiobotocore set in pyproject.toml must pass this: S3 requests separated by idle gaps longer
than `read_timeout`, interleaved with requests that are cancelled mid-flight by our own deadline.
"""

from __future__ import annotations

import asyncio

from .conftest import Bucket, FakeClock, MakeProxy
from .shim import Fault, Shim

READ_TIMEOUT = 0.3


async def test_pooled_connections_survive_idle_gaps_and_cancelled_requests(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    proxy = await make_proxy(s3={"read_timeout": READ_TIMEOUT, "request_timeout": 0.5, "max_attempts": 1,
                                      "max_connections": 2})
    for i in range(12):
        bucket.put(f"k{i}.html", b"x" * i)
    shim.faults["slow.html"] = Fault(delay=1.0)
    for round_ in range(3):
        # Warm the pool with concurrent requests, then let every pooled connection sit idle.
        keys = [f"k{4 * round_ + j}.html" for j in range(4)]
        first = await asyncio.gather(*(proxy.get(f"/docs/{k}") for k in keys))
        assert [r.status for r in first] == [200] * 4
        # The subject of this test is wall-clock idleness of pooled sockets: no fake clock can stand in.
        await asyncio.sleep(READ_TIMEOUT * 2)
        # A request that our own deadline cancels mid-flight (the socket is dropped, not returned).
        slow = await proxy.get("/docs/slow.html")
        assert slow.status == 504
        # Revalidations reuse the idle pooled connections: none may fail instantly.
        clock.advance(61)
        again = await asyncio.gather(*(proxy.get(f"/docs/{k}") for k in keys))
        assert [r.status for r in again] == [200] * 4, [await r.text() for r in again]
        assert {r.headers["X-Cache"] for r in again} == {"REVALIDATED"}

"""The breaker after an outage, and S3 requests counted as S3 received them (issue 11, defects 1 and 2).

A lone upstream has nothing to fail over to: the breaker may only spare a request that has a stale copy from
waiting on S3. Whatever the proxy reports (/stats, /metrics, the access log) must equal what the shim saw.
"""

from __future__ import annotations

import collections
import os

from prometheus_client.parser import text_string_to_metric_families

from .conftest import Bucket, FakeClock, MakeProxy
from .shim import Fault, Shim

TOKEN = "breaker-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_cold_requests_ask_s3_as_soon_as_it_is_back(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    proxy = await make_proxy(s3={"breaker_threshold": 5, "breaker_cooldown": 10})
    bucket.put("cold.html", b"cold page")
    await shim.refuse()
    for i in range(5):  # five failures: the breaker opens, and stays open for the cooldown (no clock moves)
        assert (await proxy.get(f"/docs/down{i}.html")).status == 502
    await shim.listen()
    resp = await proxy.get("/docs/cold.html")
    assert (resp.status, await resp.read(), resp.headers["X-Cache"]) == (200, b"cold page", "MISS")
    statuses = [(await proxy.get("/docs/no-such-page.html")).status for _ in range(10)]
    assert statuses == [404] * 10


async def test_a_missing_key_is_404_not_502_while_the_breaker_is_open(
        make_proxy: MakeProxy, shim: Shim) -> None:
    proxy = await make_proxy(s3={"breaker_threshold": 2, "breaker_cooldown": 10})
    shim.fault = Fault(status=503, code="SlowDown")
    for i in range(2):
        assert (await proxy.get(f"/docs/slow{i}.html")).status == 502
    shim.fault = None
    assert (await proxy.get("/docs/missing.html")).status == 404  # S3 was asked, and said so


async def test_proxy_counts_equal_what_s3_received_through_an_outage_and_recovery(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    # Two attempts per call (botocore waits up to 1 s between them), within a deadline that a blackholed
    # request reaches.
    proxy = await make_proxy(s3={"max_attempts": 2, "breaker_threshold": 2, "breaker_cooldown": 10,
                                 "request_timeout": 3.0},
                             admin={"token": TOKEN, "readiness_ttl": 0})
    pages = {f"p{i}.html": os.urandom(2000) for i in range(4)}
    for key, body in pages.items():
        bucket.put(key, body)
        assert (await proxy.get(f"/docs/{key}")).status == 200
    # S3 answers 500: botocore retries each call, and every attempt reached S3.
    shim.faults["flaky.html"] = Fault(status=500, code="InternalError", ops=frozenset({"GET"}))
    assert (await proxy.get("/docs/flaky.html")).status == 502
    # S3 refuses connections: nothing is received, the breaker opens, stale copies are served.
    await shim.refuse()
    clock.advance(61)
    for key in pages:
        assert (await proxy.get(f"/docs/{key}")).headers["X-Cache"] == "STALE"
    assert (await proxy.get("/docs/cold.html")).status == 502  # asked despite the breaker: nothing to serve
    # S3 blackholes: requests arrive and our deadline abandons them.
    await shim.listen()
    shim.fault = Fault(blackhole=True)
    clock.advance(11)
    assert (await proxy.get("/docs/p0.html")).headers["X-Cache"] == "STALE"
    # Recovery.
    shim.fault = None
    await shim.close_hanging()
    clock.advance(11)
    assert (await proxy.get("/docs/p1.html")).headers["X-Cache"] == "REVALIDATED"
    bucket.put("cold.html", b"now here")
    assert await (await proxy.get("/docs/cold.html")).read() == b"now here"
    await proxy.get("/readyz")

    stats = await (await proxy.get("/_admin/stats", headers=AUTH)).json()
    received = {op: shim.counts.get(op, 0) for op in ("GET", "HEAD", "LIST")}
    assert stats["s3_requests"] == received
    assert received["GET"] >= 4 + 2 and received["HEAD"] >= 1 and received["LIST"] >= 1  # the sequence ran
    metrics = await (await proxy.get("/_admin/metrics", headers=AUTH)).text()
    samples: dict[str, float] = collections.Counter()
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples if family.name == "cachingproxy_s3_requests" else ():
            if sample.name == "cachingproxy_s3_requests_total":
                samples[sample.labels["operation"]] += sample.value  # summed over the site label
    assert samples == {op: float(n) for op, n in received.items()}


async def test_readyz_says_ready_within_one_readiness_ttl_of_s3_answering_again(
        make_proxy: MakeProxy, shim: Shim, clock: FakeClock) -> None:
    proxy = await make_proxy(s3={"breaker_threshold": 1, "breaker_cooldown": 3600}, admin={"readiness_ttl": 5})
    await shim.refuse()
    for i in range(3):  # the breaker opens, with a cooldown far longer than the readiness TTL
        assert (await proxy.get(f"/docs/x{i}.html")).status == 502
    assert (await (await proxy.get("/readyz")).json())["s3"] == "unreachable"
    await shim.listen()
    clock.advance(5)
    assert (await (await proxy.get("/readyz")).json())["s3"] == "ok"

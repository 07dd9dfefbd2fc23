"""Operations over real sockets: warm, purge, stats, /metrics, health checks, the admin guard and the access log."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from cachingproxy.app import create_app, server_kwargs
from cachingproxy.config import ADMIN_TOKEN_ENV as TOKEN_ENV
from cachingproxy.config import ConfigError, parse_config, with_env_token
from cachingproxy.monitoring import OPS, Ops
from cachingproxy.s3state import S3State, readiness
from cachingproxy.warm import NOT_STORED
from cachingproxy.worker import claim_leadership

from .conftest import Bucket, FakeClock, MakeProxy, ProxyClient, config_for, free_port, service_of
from .shim import Fault, Shim

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TTL = 60  # conftest's [cache] ttl


def seed(bucket: Bucket, prefix: str, count: int) -> dict[str, bytes]:
    """`count` small distinct objects under `prefix`, uploaded in parallel straight to moto."""
    bodies = {f"{prefix}page-{i:04d}.html": f"<p>page {i}</p>".encode() * (1 + i % 7) for i in range(count)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: bucket.put(*item), bodies.items()))
    return bodies


def ops(proxy: ProxyClient) -> Ops:
    ops: Ops = proxy.app[OPS]
    return ops


async def start_warm(proxy: ProxyClient, prefix: str) -> str:
    resp = await proxy.post("/_admin/warm", json={"prefix": prefix}, headers=AUTH)
    assert resp.status == 202
    assert resp.headers["Location"] == f"/_admin/warm/{(await resp.json())['id']}"
    job_id: str = (await resp.json())["id"]
    return job_id


async def warm(proxy: ProxyClient, prefix: str) -> dict[str, Any]:
    """Start a warm, wait for it through the job's own awaitable (no polling, no sleeps), return its JSON."""
    job_id = await start_warm(proxy, prefix)
    await ops(proxy).warmers["default"].wait(job_id)
    resp = await proxy.get(f"/_admin/warm/{job_id}", headers=AUTH)
    assert resp.status == 200
    job: dict[str, Any] = await resp.json()
    return job


async def stats(proxy: ProxyClient) -> dict[str, Any]:
    resp = await proxy.get("/_admin/stats", headers=AUTH)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


class Records(logging.Handler):
    """Log records of one logger, with a way to await the n-th one (the access log is written after the reply)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._grew = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._grew.set()

    async def wait_for(self, count: int) -> list[str]:
        async with asyncio.timeout(30):  # a deadline for a missing line, not a stand-in for synchronisation
            while len(self.lines) < count:
                self._grew.clear()
                await self._grew.wait()
        return self.lines


@pytest.fixture
def admin_log() -> Iterator[Records]:
    logger = logging.getLogger("cachingproxy.admin")
    records, level = Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


# -- warm ---------------------------------------------------------------------------------------------------


def not_stored(job: dict[str, Any], store_errors: int) -> set[str]:
    """Keys a warm fetched but the cache refused (a SQLite lock timeout under load; docs/reliability.md §0.7).

    Such an object is reported failed, never "fetched". There are normally none, and then every comparison
    in the warm tests is exact; on a starved machine they are exact about the rest.
    """
    keys = {f["key"] for f in job["failures"] if f["reason"] == NOT_STORED}
    assert len(keys) == store_errors
    return keys


async def test_warm_of_500_objects_fetches_each_once_and_a_second_warm_only_lists(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bodies = seed(bucket, "guides/", 500)
    bucket.put("other/not-warmed.html", b"x")
    proxy = await make_proxy(admin={"token": TOKEN})
    store = ops(proxy).store

    job = await warm(proxy, "guides/")
    total = sum(map(len, bodies.values()))
    refused = not_stored(job, store.write_errors)
    assert job | {"id": "", "started": 0, "finished": 0, "failures": []} == {
        "id": "", "site": "default", "prefix": "guides/", "listed": 500, "listed_bytes": total, "listing_done": True,
        "fetched": 500 - len(refused), "skipped": 0, "failed": len(refused), "failures": [], "bytes": total,
        "processed_bytes": total, "error": None, "started": 0, "finished": 0, "done": True}
    assert shim.counts == {"LIST": 1, "GET": 500}
    assert sorted(key for op, key in shim.log if op == "GET") == sorted(bodies)  # each exactly once

    # Unchanged prefix: only the LIST. It also counts as a check, so entries stay fresh past their first TTL.
    shim.reset_counts()
    clock.advance(TTL - 10)
    errors_before = store.write_errors
    again = await warm(proxy, "guides/")
    refused_again = not_stored(again, store.write_errors - errors_before)
    assert (again["listed"], again["skipped"]) == (500, 500 - len(refused))
    assert again["fetched"] + again["failed"] == len(refused)  # only what the cache refused the first time
    assert shim.counts == ({"LIST": 1, "GET": len(refused)} if refused else {"LIST": 1})
    assert sorted(key for op, key in shim.log if op == "GET") == sorted(refused)
    clock.advance(TTL - 10)  # 100 s after the fill, 50 s after the second warm
    shim.reset_counts()
    for key in [k for k in list(bodies)[::50] if k not in refused_again]:
        resp = await proxy.get(f"/docs/{key}")
        assert resp.headers["X-Cache"] == "HIT"
        assert await resp.read() == bodies[key]
    assert shim.counts == {}


async def test_warmed_objects_are_all_served_stale_while_s3_is_down(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bodies = seed(bucket, "", 500)
    proxy = await make_proxy(admin={"token": TOKEN})
    job = await warm(proxy, "")
    warmed = {key: body for key, body in bodies.items() if key not in not_stored(job, ops(proxy).store.write_errors)}
    assert job["fetched"] == len(warmed) > 490

    await shim.refuse()
    clock.advance(TTL + 1)
    for key, body in warmed.items():  # every object the warm reported fetched
        resp = await proxy.get(f"/docs/{key}")
        assert resp.status == 200, key
        assert resp.headers["X-Cache"] == "STALE"
        assert await resp.read() == body
    figures = await stats(proxy)
    assert figures["stale_served"] == figures["responses"]["STALE"] == len(warmed)
    assert figures["s3"] == "unreachable"
    # The outage is visible, not masked: still 200 (the mirror serves), but "degraded", and counted.
    resp = await proxy.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"status": "degraded", "cache": "ok", "s3": "unreachable",
                                                      "reason": "S3 unreachable: serving from the cache"})
    metrics = scrape(await (await proxy.get("/_admin/metrics", headers=AUTH)).text())
    assert metrics[("cachingproxy_stale_served_total", (SITE,))] == len(warmed)
    assert metrics[("cachingproxy_request_duration_seconds_count", (("cache", "STALE"), SITE))] == len(warmed)


async def test_warm_refetches_only_what_changed_and_reports_failures_without_s3_text(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    for name in ("a.html", "b.html", "c.html"):
        bucket.put(f"site/{name}", name.encode())
    bucket.put("elsewhere.html", b"outside [s3] prefix")
    bucket.put("site/folder/", b"")  # a console-made "folder": never servable, so never warmed
    proxy = await make_proxy(s3={"prefix": "site/"}, admin={"token": TOKEN})
    first = await warm(proxy, "")
    assert (first["listed"], first["fetched"]) == (3, 3)

    bucket.put("site/b.html", b"b, second edition")
    await proxy.post("/_admin/purge", json={"key": "c.html"}, headers=AUTH)
    shim.faults["site/c.html"] = Fault(status=403, code="AccessDenied", ops=frozenset({"GET"}))
    shim.reset_counts()
    resp = await proxy.get(f"/_admin/warm/{await start_warm(proxy, '')}", headers=AUTH)
    job = await ops(proxy).warmers["default"].wait((await resp.json())["id"])
    assert (job.fetched, job.skipped, job.failed) == (1, 1, 1)
    assert job.failures == [("c.html", "denied by S3")]
    assert shim.counts == {"LIST": 1, "GET": 2}
    text = await (await proxy.get(f"/_admin/warm/{job.id}", headers=AUTH)).text()
    for leak in (bucket.name, "AccessDenied", "<Error>", str(shim.port)):
        assert leak not in text
    b = await proxy.get("/docs/b.html")
    assert (b.headers["X-Cache"], await b.read()) == ("HIT", b"b, second edition")


async def test_a_warm_the_cache_cannot_keep_reports_each_object_failed(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    bucket.put("guides/a.html", b"a")
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache directory cannot be created below a file")
    proxy = await make_proxy(cache={"directory": str(blocker / "cache")}, admin={"token": TOKEN})
    job = await warm(proxy, "guides/")
    assert (job["fetched"], job["failed"], job["bytes"]) == (0, 1, 1)
    assert job["failures"] == [{"key": "guides/a.html", "reason": NOT_STORED}]
    assert shim.counts == {"LIST": 1, "GET": 1}


async def test_a_failed_listing_ends_the_job_with_a_short_reason(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    proxy = await make_proxy(admin={"token": TOKEN})
    await shim.refuse()
    job = await warm(proxy, "guides/")
    assert job["done"] and job["listed"] == 0
    assert job["error"] == "listing failed: S3 unavailable, or the body failed verification"


async def test_one_warm_per_prefix_at_a_time_and_mirror_rounds_never_pile_up(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put("guides/a.html", b"a")
    shim.fault = Fault(stall_after=0, ops=frozenset({"GET"}))  # the GET hangs until shim.release
    proxy = await make_proxy(admin={"token": TOKEN})
    first = await start_warm(proxy, "guides/")
    resp = await proxy.post("/_admin/warm", json={"prefix": "guides/"}, headers=AUTH)
    assert await resp.json() == {"id": first, "site": "default", "prefix": "guides/", "created": False}
    warmer = ops(proxy).warmers["default"]
    for _ in range(3):
        assert [job.id for job in warmer.tick(("guides/",))] == [first]
    other = await start_warm(proxy, "reference/")  # another prefix is another job
    assert other != first
    await warmer.wait(other)
    listing = await (await proxy.get("/_admin/warm", headers=AUTH)).json()
    assert [(job["id"], job["done"]) for job in listing["jobs"]] == [(other, True), (first, False)]

    shim.release.set()
    assert (await warmer.wait(first)).fetched == 1
    again = await start_warm(proxy, "guides/")  # finished: the next round is a new job
    assert again != first
    assert (await warmer.wait(again)).skipped == 1
    assert shim.counts["GET"] == 1
    assert (await proxy.get("/_admin/warm/nope", headers=AUTH)).status == 404


async def test_mirror_mode_warms_its_prefixes_at_start(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bodies = seed(bucket, "guides/", 20)
    bucket.put("blog/post.html", b"not mirrored")
    proxy = await make_proxy(admin={"token": TOKEN, "warm_prefixes": ["guides/"]})
    (job,) = ops(proxy).warmers["default"].recent()
    assert (await ops(proxy).warmers["default"].wait(job.id)).fetched == 20
    assert shim.counts == {"LIST": 1, "GET": 20}
    for key in bodies:
        assert (await proxy.get(f"/docs/{key}")).headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("body", [
    {"prefix": "/guides/"}, {"prefix": 3}, {"prefix": "g", "extra": 1}, ["guides/"], {"prefix": "x" * 1025}])
async def test_warm_rejects_bad_requests(make_proxy: MakeProxy, shim: Shim, body: Any) -> None:
    proxy = await make_proxy(admin={"token": TOKEN})
    resp = await proxy.post("/_admin/warm", json=body, headers=AUTH)
    assert resp.status == 400
    assert "error" in await resp.json()
    assert shim.counts == {}


# -- purge --------------------------------------------------------------------------------------------------


async def test_purge_by_key_prefix_and_all(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    keys = ["a.html", "guides/b.html", "guides/c.html", "ref/d.html"]
    for key in keys:
        bucket.put(f"site/{key}", key.encode())
    proxy = await make_proxy(s3={"prefix": "site/"}, admin={"token": TOKEN})

    async def outcome(key: str) -> str:
        resp = await proxy.get(f"/docs/{key}")
        assert await resp.read() == key.encode()
        return str(resp.headers["X-Cache"])

    async def purge(body: dict[str, Any]) -> int:
        resp = await proxy.post("/_admin/purge", json=body, headers=AUTH)
        assert resp.status == 200
        purged: int = (await resp.json())["purged"]
        return purged

    assert [await outcome(k) for k in keys] == ["MISS"] * 4
    await service_of(proxy).settle()  # committed: a response may end before its body is indexed
    assert (await stats(proxy))["entries"] == 4
    assert await purge({"key": "a.html"}) == 1
    assert await purge({"key": "a.html"}) == 0
    assert [await outcome(k) for k in keys] == ["MISS", "HIT", "HIT", "HIT"]
    assert await purge({"prefix": "guides/"}) == 2
    assert [await outcome(k) for k in keys] == ["HIT", "MISS", "MISS", "HIT"]
    assert await purge({"all": True}) == 4
    assert (await stats(proxy))["entries"] == 0
    assert [await outcome(k) for k in keys] == ["MISS"] * 4

    for bad in ({}, {"key": ""}, {"key": 1}, {"all": False}, {"all": 1}, {"key": "a", "prefix": "b"}, ["a"]):
        resp = await proxy.post("/_admin/purge", json=bad, headers=AUTH)
        assert resp.status == 400, bad
    assert (await stats(proxy))["entries"] == 4


# -- stats and /metrics -------------------------------------------------------------------------------------


SITE, NONE = ("site", "default"), ("site", "-")  # the per-site label of a single-site proxy's series


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_stats_and_metrics_agree_with_the_s3_requests_counted_at_the_shim(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock) -> None:
    bucket.put("a.html", b"a" * 1000)
    bucket.put("b.html", b"b" * 2000)
    bucket.put("c.html", b"c" * 3000)
    proxy = await make_proxy(admin={"token": TOKEN})
    outcomes: list[str] = []
    served = 0

    async def get(path: str, method: str = "GET") -> None:
        nonlocal served
        resp = await proxy.request(method, path)
        body = await resp.read()
        if "X-Cache" in resp.headers:
            outcomes.append(resp.headers["X-Cache"])
            served += len(body)

    await get("/docs/a.html")  # MISS: GET
    await get("/docs/a.html")  # HIT
    await get("/docs/b.html", "HEAD")  # MISS: HEAD
    await get("/docs/missing.html")  # 404: GET, then a HEAD for missing.html/index.html
    await get("/docs/missing.html")  # negative cache
    clock.advance(TTL + 1)
    await get("/docs/a.html")  # REVALIDATED: HEAD
    assert (await warm(proxy, ""))["fetched"] == 2  # LIST, GET b and c
    await get("/docs/c.html")  # HIT
    assert (await proxy.get("/readyz")).status == 200  # LIST

    figures = await stats(proxy)
    assert figures["s3_requests"] == {op: shim.counts[op] for op in ("GET", "HEAD", "LIST")}
    # GET: a, missing.html, then b and c by the warm. HEAD: b, missing.html/index.html (the dir/ redirect check),
    # a's revalidation. LIST: the warm and the readiness probe.
    assert shim.counts == {"GET": 4, "HEAD": 3, "LIST": 2}
    assert figures["responses"] == {o: outcomes.count(o) for o in ("HIT", "MISS", "REVALIDATED", "STALE")}
    assert figures["hits"] == outcomes.count("HIT") == figures["s3_requests_saved"] == 2
    assert figures["revalidations"] == {"unchanged": 1, "changed": 0}
    assert figures["negative_hits"] == 2  # missing.html and its index.html, the second time
    assert figures["hit_ratio"] == pytest.approx(3 / 5, abs=1e-4)
    assert figures["bytes_from_s3"] == 6000
    assert figures["bytes_served"] == served == 1000 + 1000 + 1000 + 3000
    assert (figures["entries"], figures["size_limit"], figures["cache"]) == (3, 1024 * 1024 * 1024, "ok")
    assert figures["bytes_on_disk"] >= 6000
    clock.advance(30)
    assert (await stats(proxy))["uptime"] == pytest.approx(TTL + 1 + 30)

    resp = await proxy.get("/_admin/metrics", headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    # Not on the public port unless asked for, and not without the token.
    assert (await proxy.get("/metrics")).status == 404
    assert (await proxy.get("/_admin/metrics")).status == 401
    metrics = scrape(await resp.text())
    for op in ("GET", "HEAD", "LIST"):
        assert metrics[("cachingproxy_s3_requests_total", (("operation", op), SITE))] == shim.counts[op], op
        assert metrics[("cachingproxy_s3_requests_total", (("operation", op), NONE))] == 0, op
    assert metrics[("cachingproxy_cache_hits_total", (SITE,))] == figures["hits"]
    assert metrics[("cachingproxy_cache_misses_total", (SITE,))] == figures["misses"]
    assert metrics[("cachingproxy_revalidations_total", (("result", "unchanged"), SITE))] == 1
    assert metrics[("cachingproxy_stale_served_total", (SITE,))] == 0
    assert metrics[("cachingproxy_served_bytes_total", (SITE,))] == served
    assert metrics[("cachingproxy_s3_received_bytes_total", (SITE,))] == 6000
    assert metrics[("cachingproxy_cache_entries", ())] == 3
    for outcome in ("HIT", "MISS", "REVALIDATED", "STALE"):
        count = metrics[("cachingproxy_request_duration_seconds_count", (("cache", outcome), SITE))]
        assert count == outcomes.count(outcome), outcome


# -- the guard ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": "Bearer wrong"}, id="wrong"),
    pytest.param({"Authorization": f"Bearer {TOKEN}x"}, id="longer"),
    pytest.param({"Authorization": TOKEN}, id="no-scheme"),
    pytest.param({"Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()}, id="basic"),
    pytest.param({"Cookie": f"token={TOKEN}"}, id="cookie"),
])
async def test_missing_or_wrong_token_is_401_and_changes_nothing(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, headers: dict[str, str]) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy(admin={"token": TOKEN})
    assert await (await proxy.get("/docs/a.html")).read() == b"a"
    await service_of(proxy).settle()  # the fill is committed, so the last GET below can only be a HIT
    shim.reset_counts()
    for method, path, body in [("POST", "/_admin/purge", {"all": True}), ("POST", "/_admin/warm", {"prefix": ""}),
                               ("GET", "/_admin/stats", None), ("GET", "/_admin/warm", None),
                               ("GET", "/_admin/warm/abc", None), ("GET", "/_admin/nowhere", None)]:
        resp = await proxy.request(method, path, json=body, headers=headers)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert await resp.json() == {"error": "unauthorized"}
    assert shim.counts == {}  # no LIST from a warm, no readiness probe from stats
    assert ops(proxy).warmers["default"].recent() == []
    assert (await proxy.get("/docs/a.html")).headers["X-Cache"] == "HIT"  # the purge did nothing


async def test_admin_is_off_without_a_token_and_says_so(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, admin_log: Records) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy()
    assert await (await proxy.get("/docs/a.html")).read() == b"a"
    await service_of(proxy).settle()  # committed, so the HIT asserted at the end can only fail on a purge
    for method, path in [("GET", "/_admin/"), ("GET", "/_admin"), ("GET", "/_admin/stats"),
                         ("POST", "/_admin/purge"), ("POST", "/_admin/warm")]:
        resp = await proxy.request(method, path, json={"all": True}, headers={"Authorization": "Bearer "})
        assert resp.status == 404, path
    assert any("admin API off" in line and TOKEN_ENV in line for line in admin_log.lines)
    assert (await proxy.get("/docs/a.html")).headers["X-Cache"] == "HIT"
    # Health checks need no admin API; /metrics lives with it.
    assert await (await proxy.get("/healthz")).json() == {"status": "ok"}
    assert (await proxy.get("/readyz")).status == 200
    assert (await proxy.get("/metrics")).status == 404
    assert (await proxy.get("/_admin/metrics")).status == 404
    assert any("admin API off, and with it /_admin/metrics" in line for line in admin_log.lines)


async def test_public_metrics_is_a_choice(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy(admin={"public_metrics": True})
    assert (await proxy.get("/docs/a.html")).status == 200
    resp = await proxy.get("/metrics")
    assert resp.status == 200
    assert scrape(await resp.text())[("cachingproxy_cache_misses_total", (SITE,))] == 1


async def test_admin_refuses_foreign_hosts_oversize_bodies_and_forms(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy(admin={"token": TOKEN, "allowed_hosts": ["mirror.office.lan", "127.0.0.1"]})
    assert await (await proxy.get("/docs/a.html")).read() == b"a"
    await service_of(proxy).settle()  # committed, so the HIT asserted at the end can only fail on a purge
    for host in ("evil.example", "evil.example:8080", "mirror.office.lan.evil.example", "[::1]"):
        for path in ("/_admin/", "/_admin/stats"):
            resp = await proxy.get(path, headers={**AUTH, "Host": host})
            assert resp.status == 403, (host, path)
    assert (await proxy.get("/_admin/stats", headers={**AUTH, "Host": "Mirror.Office.LAN.:8080"})).status == 200

    huge = json.dumps({"key": "x" * (70 * 1024)})
    resp = await proxy.post("/_admin/purge", data=huge, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 413
    form = await proxy.post("/_admin/purge", data={"all": "true"}, headers=AUTH)  # what a cross-site form sends
    assert form.status == 415
    garbage = await proxy.post("/_admin/purge", data=b"{", headers={**AUTH, "Content-Type": "application/json"})
    assert garbage.status == 400
    assert (await proxy.get("/docs/a.html")).headers["X-Cache"] == "HIT"


async def test_admin_on_its_own_port(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put("guides/a.html", b"a")
    port = free_port()
    proxy = await make_proxy(admin={"token": TOKEN, "host": "127.0.0.1", "port": port})
    assert (await proxy.get("/_admin/stats", headers=AUTH)).status == 404  # not on the proxy's port
    base = f"http://127.0.0.1:{port}/_admin"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/stats") as resp:
            assert resp.status == 401
        async with session.post(f"{base}/warm", json={"prefix": "guides/"}, headers=AUTH) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["id"]
        assert (await ops(proxy).warmers["default"].wait(job_id)).fetched == 1
        async with session.get(f"{base}/stats", headers=AUTH) as resp:
            assert (await resp.json())["s3_requests"]["GET"] == 1
        async with session.get(f"{base}/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
        async with session.get(f"{base}/metrics", headers=AUTH) as resp:  # /metrics goes where the admin API is
            assert resp.status == 200 and "cachingproxy_cache_hits_total" in await resp.text()
    assert (await proxy.get("/_admin/metrics", headers=AUTH)).status == 404
    assert (await proxy.get("/metrics")).status == 404
    assert (await proxy.get("/docs/guides/a.html")).headers["X-Cache"] == "HIT"


async def test_workers_on_one_cache_share_one_admin_listener_and_one_mirror(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    """[server] workers > 1: each worker builds the app on the same cache directory; one of them leads."""
    bucket.put("guides/a.html", b"a")
    port = free_port()
    settings = {"token": TOKEN, "host": "127.0.0.1", "port": port, "warm_prefixes": ["guides/"]}
    directory = str(tmp_path / "cache")
    lead = claim_leadership(directory)
    assert lead is not None and claim_leadership(directory) is None  # the lock file elects exactly one
    first = await make_proxy(admin=settings, leader=True)
    second = await make_proxy(admin=settings, leader=False)  # would fail with EADDRINUSE if it bound the port
    (job,) = ops(first).warmers["default"].recent()
    assert ops(second).warmers["default"].recent() == []  # no second mirror: the LIST is not doubled
    assert (await ops(first).warmers["default"].wait(job.id)).fetched == 1
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/_admin/warm",
                                                                headers=AUTH) as resp:
        assert [j["id"] for j in (await resp.json())["jobs"]] == [job.id]
    assert shim.counts == {"LIST": 1, "GET": 1}
    # Both workers serve the same disk cache.
    assert (await second.get("/docs/guides/a.html")).headers["X-Cache"] == "HIT"
    os.close(lead)


# -- health -------------------------------------------------------------------------------------------------


U, D, N, OK = S3State.UNREACHABLE, S3State.DENIED, S3State.NO_SUCH_BUCKET, S3State.OK


@pytest.mark.parametrize(("cache_ok", "cached", "s3", "expected"), [
    (True, True, OK, (200, "ready")),
    (True, False, OK, (200, "ready")),
    (False, False, OK, (200, "degraded")),  # cache unusable, passing through to S3
    (True, True, U, (200, "degraded")),  # S3 down, the mirror serves what it has: visible, not fatal
    (True, False, U, (503, "unavailable")),  # nothing to serve
    (False, False, U, (503, "unavailable")),
    (True, True, D, (503, "unavailable")),  # configuration: waiting will not fix it, whatever is cached
    (True, True, N, (503, "unavailable")),
    (False, False, N, (503, "unavailable")),
])
def test_readiness_table(cache_ok: bool, cached: bool, s3: S3State, expected: tuple[int, str]) -> None:
    status, word, reason = readiness(cache_ok, cached, s3)
    assert (status, word) == expected
    assert bool(reason) is (word != "ready")


async def test_readyz_is_ready_then_degraded_when_s3_goes_away(
        make_proxy: MakeProxy, shim: Shim, bucket: Bucket, clock: FakeClock) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy()
    assert (await proxy.get("/docs/a.html")).status == 200
    await service_of(proxy).settle()
    resp = await proxy.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"status": "ready", "cache": "ok", "s3": "ok"})
    await asyncio.gather(*(proxy.get("/readyz") for _ in range(10)))
    assert shim.counts == {"GET": 1, "LIST": 1}  # remembered for readiness_ttl
    await shim.refuse()
    clock.advance(5)
    resp = await proxy.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"status": "degraded", "cache": "ok", "s3": "unreachable",
                                                      "reason": "S3 unreachable: serving from the cache"})
    assert await (await proxy.get("/healthz")).json() == {"status": "ok"}


async def test_readyz_is_503_when_there_is_nothing_to_serve(
        make_proxy: MakeProxy, shim: Shim, clock: FakeClock, tmp_path: Path) -> None:
    empty = await make_proxy()
    await shim.refuse()
    resp = await empty.get("/readyz")
    assert (resp.status, await resp.json()) == (503, {"status": "unavailable", "cache": "ok", "s3": "unreachable",
                                                      "reason": "S3 unreachable and nothing cached to serve"})
    await shim.listen()
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache directory cannot be created below a file")
    proxy = await make_proxy(cache={"directory": str(blocker / "cache")})
    resp = await proxy.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"status": "degraded", "cache": "unavailable", "s3": "ok",
                                                      "reason": "cache unavailable: serving from S3"})
    await shim.refuse()
    clock.advance(5)
    resp = await proxy.get("/readyz")
    assert (resp.status, await resp.json()) == (503, {"status": "unavailable", "cache": "unavailable",
                                                      "s3": "unreachable",
                                                      "reason": "S3 unreachable and nothing cached to serve"})


# -- dashboard ----------------------------------------------------------------------------------------------


async def test_dashboard_page_needs_no_token_holds_no_data_and_pins_its_inline_code(
        make_proxy: MakeProxy, shim: Shim) -> None:
    proxy = await make_proxy(admin={"token": TOKEN})
    bare = await proxy.get("/_admin", allow_redirects=False)
    assert (bare.status, bare.headers["Location"]) == (302, "/_admin/")
    resp = await proxy.get("/_admin/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    csp = resp.headers["Content-Security-Policy"]
    for tag in ("script", "style"):
        (code,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp, tag
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert resp.headers["Cache-Control"] == "no-store"
    assert TOKEN not in page and shim.counts == {}
    # The token is kept per tab and only ever sent as a header.
    assert "sessionStorage" in page and '"Authorization": "Bearer "' in page and "document.cookie" not in page


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_dashboard_script_parses(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parents[1] / "cachingproxy" / "dashboard.html").read_text()
    (code,) = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    script = tmp_path / "dashboard.js"
    script.write_text(code)
    subprocess.run(["node", "--check", str(script)], check=True, capture_output=True)


# -- access log ---------------------------------------------------------------------------------------------


async def test_access_log_is_one_json_line_per_request_with_the_s3_calls_it_caused(
        aiohttp_client: AiohttpClient, tmp_path: Path, shim: Shim, bucket: Bucket, clock: FakeClock) -> None:
    bucket.put("a.html", b"a" * 100)
    records = Records()
    logger = logging.getLogger("test.access")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        config = config_for(tmp_path, shim.url, bucket.name, admin={"token": TOKEN})
        # The listener settings `serve` runs with. start_server, not TestServer(**kwargs): aiohttp's
        # TestServer drops constructor keywords it does not know, and the log would silently be the default.
        server = TestServer(create_app(config, clock=clock))
        await server.start_server(**server_kwargs(config), access_log=logger)
        proxy = cast(ProxyClient, await aiohttp_client(server))  # see conftest.make_proxy
        responses = [await proxy.get("/docs/a.html")]
        assert len(await responses[0].read()) == 100
        await service_of(proxy).settle()  # committed: the next GET is a HIT, not a join of the same fill
        responses.append(await proxy.get("/docs/a.html?utm=x"))
        assert len(await responses[1].read()) == 100
        clock.advance(TTL + 1)
        responses.append(await proxy.head("/docs/a.html"))
        responses.append(await proxy.get("/_admin/stats?token=secret", headers=AUTH))
        sent_ids = []
        for resp in responses:
            sent_ids.append(resp.headers["X-Request-Id"])
        lines = [json.loads(line) for line in await records.wait_for(4)]
    finally:
        logger.removeHandler(records)
    varying = {"ms", "time", "id"}
    agent = lines[0]["ua"]
    assert agent.startswith("Python/") and "aiohttp" in agent  # the test client's
    assert [{k: v for k, v in line.items() if k not in varying} for line in lines] == [
        {"site": "default", "client": "127.0.0.1", "method": "GET", "path": "/docs/a.html", "status": 200,
         "bytes": 100, "cache": "MISS", "s3": {"GET": 1}, "ua": agent},
        {"site": "default", "client": "127.0.0.1", "method": "GET", "path": "/docs/a.html", "status": 200,
         "bytes": 100, "cache": "HIT", "s3": {}, "ua": agent},
        {"site": "default", "client": "127.0.0.1", "method": "HEAD", "path": "/docs/a.html", "status": 200,
         "bytes": 0, "cache": "REVALIDATED", "s3": {"HEAD": 1}, "ua": agent},
        {"site": "-", "client": "127.0.0.1", "method": "GET", "path": "/_admin/stats", "status": 200,
         "bytes": lines[3]["bytes"], "cache": "-", "s3": {"LIST": 1}, "ua": agent},
    ]
    assert [list(line) for line in lines] == [["time", "site", "client", "method", "path", "status", "bytes",
                                               "cache", "ms", "s3", "ua", "id"]] * 4
    assert all(isinstance(line["ms"], float) for line in lines)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in lines)
    assert [line["id"] for line in lines] == sent_ids and len(set(sent_ids)) == 4
    assert not any(TOKEN in raw or "secret" in raw for raw in records.lines)


# -- configuration ------------------------------------------------------------------------------------------


def test_admin_config_parses_lists_and_the_environment_token_wins() -> None:
    config = parse_config({"s3": {"bucket": "b"}, "admin": {
        "token": "from-file", "warm_prefixes": ["guides/", "api/"], "allowed_hosts": ["mirror.lan"],
        "warm_interval": 3600, "port": 8081}})
    assert config.admin.warm_prefixes == ("guides/", "api/")
    assert config.admin.allowed_hosts == ("mirror.lan",)
    assert (config.admin.warm_interval, config.admin.port, config.admin.warm_concurrency) == (3600.0, 8081, 8)
    assert with_env_token(config, {TOKEN_ENV: "from-env"}).admin.token == "from-env"
    assert with_env_token(config, {}).admin.token == "from-file"
    assert with_env_token(config, {TOKEN_ENV: ""}).admin.token == "from-file"


@pytest.mark.parametrize(("admin", "message"), [
    ({"warm_prefixes": "guides/"}, "admin.warm_prefixes: must be an array of strings"),
    ({"warm_prefixes": ["/guides/"]}, "admin.warm_prefixes: must be key prefixes"),
    ({"allowed_hosts": [1]}, "admin.allowed_hosts: must be an array of strings"),
    ({"port": 70000}, "admin.port: must be 0-65535"),
    ({"warm_concurrency": 0}, "admin.warm_concurrency: must be 1-256"),
    ({"warm_interval": -1}, "admin.warm_interval: must be >= 0"),
    ({"readiness_ttl": "5"}, "admin.readiness_ttl: must be float"),
    ({"path": "/_admin/"}, "admin.path: must be a plain path"),
])
def test_bad_admin_config_names_the_key(admin: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"s3": {"bucket": "b"}, "admin": admin}, "test.toml")


def test_the_job_board_stays_bounded_and_never_reads_outside_its_directory(tmp_path: Path) -> None:
    from cachingproxy.warm import KEEP_JOBS, JobBoard

    board = JobBoard(tmp_path / "warm-jobs")
    (tmp_path / "secret.json").write_text('{"id": "secret"}')
    for i in range(KEEP_JOBS + 5):
        board.publish({"id": f"{i:012x}", "started": float(i)})
    assert len(list((tmp_path / "warm-jobs").glob("*.json"))) == KEEP_JOBS  # mirror mode never fills the disk
    assert [job["id"] for job in board.recent()][:2] == [f"{KEEP_JOBS + 4:012x}", f"{KEEP_JOBS + 3:012x}"]
    assert board.read("../secret") is None
    assert board.read(f"{KEEP_JOBS + 4:012x}") == {"id": f"{KEEP_JOBS + 4:012x}", "started": float(KEEP_JOBS + 4)}


@pytest.mark.parametrize(("key", "status"), [
    pytest.param("é" * 512, 200, id="1024-bytes-accepted"),
    pytest.param("é" * 513, 400, id="1026-bytes-refused-though-513-characters"),
    pytest.param("a" * 1025, 400, id="1025-ascii-refused"),
])
async def test_admin_key_limit_counts_bytes_like_s3(make_proxy: MakeProxy, key: str, status: int) -> None:
    proxy = await make_proxy(admin={"token": TOKEN})
    for path, body in (("/_admin/purge", {"key": key}), ("/_admin/purge", {"prefix": key}),
                       ("/_admin/warm", {"prefix": key})):
        resp = await proxy.post(path, json=body, headers=AUTH)
        assert resp.status == (202 if status == 200 and path.endswith("warm") else status), (path, await resp.text())

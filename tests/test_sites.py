"""Several docs sites in one proxy (issue 12), over real sockets against moto with three buckets.

Sites are routed by Host and mount, each with its own bucket, prefix, TTLs, error document and headers; they
share one cache on disk, and a site whose S3 endpoint is down never degrades another.
"""

from __future__ import annotations

import collections
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from cachingproxy.app import create_app, server_kwargs
from cachingproxy.appkeys import SITES
from cachingproxy.config import ConfigError, parse_config
from cachingproxy.monitoring import OPS
from cachingproxy.profiles import profile_problems

from .conftest import Bucket, FakeClock
from .shim import Shim
from .test_admin_client import run_cli

TOKEN = "sites-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
S3 = {"addressing_style": "path", "max_attempts": 1, "connect_timeout": 5.0, "read_timeout": 10.0,
      "request_timeout": 15.0}

MakeSites = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def buckets(s3_client: Any) -> tuple[Bucket, Bucket, Bucket]:
    made = []
    for _ in range(3):
        name = f"t-{uuid.uuid4().hex[:16]}"
        s3_client.create_bucket(Bucket=name)
        made.append(Bucket(s3_client, name))
    return made[0], made[1], made[2]


@pytest.fixture
async def far_shim(moto_url: str, buckets: tuple[Bucket, Bucket, Bucket]) -> AsyncIterator[Shim]:
    """A second S3 endpoint (another office, another account): its own client, pool and breaker."""
    s = Shim(moto_url, buckets[2].name)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def make_sites(aiohttp_client: Any, tmp_path: Path, shim: Shim, clock: FakeClock) -> MakeSites:
    async def make(sites: list[dict[str, Any]], **sections: dict[str, Any]) -> TestClient[Any, Any]:
        data: dict[str, Any] = {"s3": {"endpoint_url": shim.url, **S3},
                                "cache": {"directory": str(tmp_path / "cache"), "ttl": 60},
                                "admin": {"token": TOKEN}, "sites": sites}
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        config = parse_config(data, "test")
        server = TestServer(create_app(config, clock=clock))
        await server.start_server(**server_kwargs(config))
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return make


async def get(proxy: TestClient[Any, Any], path: str, host: str = "proxy.test",
              **headers: str) -> tuple[int, bytes, dict[str, str]]:
    resp = await proxy.get(path, headers={"Host": host, **headers}, allow_redirects=False)
    return resp.status, await resp.read(), dict(resp.headers)


async def settle(proxy: TestClient[Any, Any]) -> None:
    for site in proxy.app[SITES]:
        await site.service.settle()


# -- routing ------------------------------------------------------------------------------------------------


async def test_exact_host_beats_wildcard_beats_any_host_then_the_longest_mount(
        make_sites: MakeSites, buckets: tuple[Bucket, Bucket, Bucket]) -> None:
    a, b, c = buckets
    for bucket in buckets:
        bucket.put("x.html", bucket.name.encode())
        bucket.put("api/x.html", b"api in " + bucket.name.encode())
    proxy = await make_sites([
        {"name": "handbook", "hosts": ["handbook.corp", "HandBook"], "mount": "/", "s3": {"bucket": a.name}},
        {"name": "api", "mount": "/api", "s3": {"bucket": b.name}},
        {"name": "wild", "hosts": ["*.docs.corp"], "mount": "/", "s3": {"bucket": c.name}},
    ])
    cases = [
        ("handbook.corp", "/x.html", a.name.encode()),
        ("HANDBOOK.corp.:8080", "/x.html", a.name.encode()),  # case, trailing dot and port are ignored
        ("handbook", "/api/x.html", b"api in " + a.name.encode()),  # an exact host beats a longer any-host mount
        ("other.corp", "/api/x.html", b.name.encode()),  # api's mount: /api/x.html is its key x.html
        ("a.docs.corp", "/x.html", c.name.encode()),
    ]
    for host, path, body in cases:
        status, got, _ = await get(proxy, path, host)
        assert (status, got) == (200, body), (host, path)
    # No site: /apiary is not under /api (segment boundaries), and a wildcard matches one level only.
    for host, path in (("other.corp", "/apiary/x.html"), ("a.b.docs.corp", "/x.html"), ("other.corp", "/x.html")):
        status, got, _ = await get(proxy, path, host)
        assert status == 404 and b"no site" in got, (host, path)
    stats = await (await proxy.get("/_admin/stats", headers=AUTH)).json()
    assert stats["unrouted"] == 3
    assert set(stats["sites"]) == {"handbook", "api", "wild"}


async def test_the_same_key_in_two_buckets_never_collides_and_two_sites_on_one_bucket_share_entries(
        make_sites: MakeSites, buckets: tuple[Bucket, Bucket, Bucket], shim: Shim) -> None:
    a, b, _ = buckets
    a.put("page.html", b"from a")
    b.put("page.html", b"from b")
    proxy = await make_sites([
        {"name": "one", "mount": "/one", "s3": {"bucket": a.name}},
        {"name": "two", "mount": "/two", "s3": {"bucket": b.name}},
        {"name": "again", "mount": "/again", "s3": {"bucket": a.name}},
    ])
    for _ in range(2):
        assert (await get(proxy, "/one/page.html"))[1] == b"from a"
        assert (await get(proxy, "/two/page.html"))[1] == b"from b"
        await settle(proxy)
    assert shim.counts == {"GET": 2}
    status, body, headers = await get(proxy, "/again/page.html")
    assert (status, body, headers["X-Cache"]) == (200, b"from a", "HIT")  # bucket a's entry, cached by "one"
    assert shim.counts == {"GET": 2}


async def test_each_site_has_its_own_ttl_and_error_document(
        make_sites: MakeSites, buckets: tuple[Bucket, Bucket, Bucket], shim: Shim, clock: FakeClock) -> None:
    a, b, _ = buckets
    a.put("p.html", b"a")
    a.put("404.html", b"<h1>handbook: not here</h1>", ContentType="text/html")
    b.put("p.html", b"b")
    proxy = await make_sites([
        {"name": "quick", "mount": "/quick", "s3": {"bucket": a.name},
         "cache": {"ttl": 30, "error_document": "404.html"}},
        {"name": "slow", "mount": "/slow", "s3": {"bucket": b.name}, "cache": {"ttl": 3600}},
    ])
    assert (await get(proxy, "/quick/p.html"))[0] == (await get(proxy, "/slow/p.html"))[0] == 200
    await settle(proxy)
    shim.reset_counts()
    clock.advance(31)
    assert (await get(proxy, "/quick/p.html"))[2]["X-Cache"] == "REVALIDATED"
    assert (await get(proxy, "/slow/p.html"))[2]["X-Cache"] == "HIT"
    assert shim.counts == {"HEAD": 1}
    assert (await get(proxy, "/quick/nope.html"))[:2] == (404, b"<h1>handbook: not here</h1>")
    status, body, _ = await get(proxy, "/slow/nope.html")
    assert status == 404 and b"handbook" not in body


async def test_warm_and_purge_of_one_site_leave_the_other_untouched(
        make_sites: MakeSites, buckets: tuple[Bucket, Bucket, Bucket], shim: Shim) -> None:
    a, b, _ = buckets
    for i in range(3):
        a.put(f"guides/a{i}.html", b"a" * 100)
        b.put(f"guides/b{i}.html", b"b" * 100)
    proxy = await make_sites([{"name": "left", "mount": "/left", "s3": {"bucket": a.name}},
                              {"name": "right", "mount": "/right", "s3": {"bucket": b.name}}])
    # With two sites, the admin API must be told which.
    resp = await proxy.post("/_admin/warm", json={"prefix": "guides/"}, headers=AUTH)
    assert resp.status == 400 and "left, right" in (await resp.json())["error"]
    resp = await proxy.post("/_admin/warm", json={"prefix": "guides/", "site": "nope"}, headers=AUTH)
    assert resp.status == 400
    assert (await get(proxy, "/right/guides/b0.html"))[0] == 200
    await settle(proxy)
    shim.reset_counts()
    resp = await proxy.post("/_admin/warm", json={"prefix": "guides/", "site": "left"}, headers=AUTH)
    assert resp.status == 202
    finished = await proxy.app[OPS].warmers["left"].wait((await resp.json())["id"])
    assert (finished.fetched, finished.site) == (3, "left")
    assert sorted(shim.log) == [("GET", f"guides/a{i}.html") for i in range(3)] + [("LIST", "guides/")]
    resp = await proxy.post("/_admin/purge", json={"all": True, "site": "left"}, headers=AUTH)
    assert (await resp.json())["purged"] == 3
    assert (await get(proxy, "/right/guides/b0.html"))[2]["X-Cache"] == "HIT"  # right's entry survived
    assert (await get(proxy, "/left/guides/a0.html"))[2]["X-Cache"] == "MISS"


async def test_a_site_whose_s3_is_down_is_served_stale_while_another_is_served_fresh(
        make_sites: MakeSites, buckets: tuple[Bucket, Bucket, Bucket], shim: Shim, far_shim: Shim,
        clock: FakeClock) -> None:
    a, _, c = buckets
    a.put("near.html", b"near")
    c.put("far.html", b"far")
    proxy = await make_sites([
        {"name": "near", "mount": "/near", "s3": {"bucket": a.name}},
        {"name": "far", "mount": "/far", "s3": {"bucket": c.name, "endpoint_url": far_shim.url}},
    ], admin={"readiness_ttl": 0})
    assert (await get(proxy, "/near/near.html"))[0] == (await get(proxy, "/far/far.html"))[0] == 200
    await settle(proxy)
    await far_shim.refuse()
    clock.advance(61)
    a.put("near.html", b"near, updated")
    status, body, headers = await get(proxy, "/far/far.html")
    assert (status, body, headers["X-Cache"]) == (200, b"far", "STALE")
    status, body, headers = await get(proxy, "/near/near.html")
    assert (status, body, headers["X-Cache"]) == (200, b"near, updated", "MISS")
    resp = await proxy.get("/readyz")
    assert (resp.status, await resp.json()) == (200, {"status": "degraded", "cache": "ok", "s3": "unreachable",
                                                      "sites": {"near": "ok", "far": "unreachable"},
                                                      "reason": "far: S3 unreachable: serving from the cache"})
    await far_shim.listen()


# -- S3 website features ----------------------------------------------------------------------------------------


async def test_website_redirect_objects_answer_301(make_sites: MakeSites,
                                                   buckets: tuple[Bucket, Bucket, Bucket]) -> None:
    a, _, _ = buckets
    a.put("old.html", b"", WebsiteRedirectLocation="/new.html")
    a.put("away.html", b"", WebsiteRedirectLocation="https://example.com/elsewhere")
    a.put("odd.html", b"odd body", WebsiteRedirectLocation="new.html")  # neither: ignored, the body is served
    proxy = await make_sites([{"name": "site", "mount": "/docs", "s3": {"bucket": a.name}}])
    for _ in range(2):  # from S3, then from the cache
        status, _, headers = await get(proxy, "/docs/old.html")
        assert (status, headers["Location"]) == (301, "/docs/new.html")
        status, _, headers = await get(proxy, "/docs/away.html")
        assert (status, headers["Location"]) == (301, "https://example.com/elsewhere")
        status, body, headers = await get(proxy, "/docs/odd.html")
        assert (status, body) == (200, b"odd body") and "Location" not in headers
        await settle(proxy)
    resp = await proxy.head("/docs/old.html", allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (301, "/docs/new.html")


HOSTILE = '<img src=x onerror="alert(1)">.html'
SCRIPT = "<script>alert(1)</script>.html"  # its "/" makes S3 list it as the folder "<script>alert(1)</"


async def test_listing_is_opt_in_escaped_and_counted_as_list_requests(
        make_sites: MakeSites, buckets: tuple[Bucket, Bucket, Bucket], shim: Shim, clock: FakeClock) -> None:
    a, _, _ = buckets
    a.put("v3/api/" + HOSTILE, b"x")
    a.put("v3/api/" + SCRIPT, b"s")
    a.put("v3/api/a b+c%.html", b"y" * 1234)
    a.put("v3/api/deep/z.html", b"z")
    proxy = await make_sites([
        {"name": "api", "mount": "/api-docs", "listing": True, "s3": {"bucket": a.name, "prefix": "v3/"}},
        {"name": "plain", "mount": "/plain", "s3": {"bucket": a.name, "prefix": "v3/"}},
    ])
    status, body, headers = await get(proxy, "/api-docs/api/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and headers["X-Cache"] == "MISS"
    page = body.decode()
    assert "<script>" not in page and "<img" not in page
    assert '>&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.html</a>' in page
    assert 'href="./%3Cimg%20src%3Dx%20onerror%3D%22alert%281%29%22%3E.html"' in page
    assert '<a href="./%3Cscript%3Ealert%281%29%3C/">&lt;script&gt;alert(1)&lt;/</a>' in page
    assert 'href="./a%20b%2Bc%25.html"' in page and "1,234" in page
    assert 'href="./deep/"' in page
    assert shim.counts == {"GET": 1, "LIST": 1}  # the index document (missing), then the listing
    before = dict(shim.counts)
    status, _, headers = await get(proxy, "/api-docs/api/")
    assert (status, headers["X-Cache"]) == (200, "HIT")
    assert shim.counts["LIST"] == before["LIST"]  # remembered for the site's TTL
    clock.advance(61)
    assert (await get(proxy, "/api-docs/api/"))[0] == 200
    assert shim.counts["LIST"] == before["LIST"] + 1
    assert (await get(proxy, "/plain/api/"))[0] == 404  # listing is off for this site
    assert (await get(proxy, "/api-docs/empty/"))[0] == 404  # nothing there: no listing
    stats = await (await proxy.get("/_admin/stats", headers=AUTH)).json()
    # Three listings (the empty folder's too), and each site's readiness probe behind /stats.
    assert (stats["sites"]["api"]["s3_requests"]["LIST"], stats["sites"]["plain"]["s3_requests"]["LIST"]) == (4, 1)
    assert shim.counts["LIST"] == 5


async def test_site_headers_are_on_every_site_response_and_not_on_the_admin_api(
        make_sites: MakeSites, buckets: tuple[Bucket, Bucket, Bucket]) -> None:
    a, _, _ = buckets
    a.put("p.html", b"p", CacheControl="max-age=5")
    a.put("dir/index.html", b"i")
    proxy = await make_sites([{"name": "secure", "mount": "/s", "s3": {"bucket": a.name},
                               "headers": {"Strict-Transport-Security": "max-age=31536000",
                                           "Cache-Control": "public, max-age=60"}}])
    for path, status in (("/s/p.html", 200), ("/s/p.html", 200), ("/s/missing.html", 404), ("/s/dir", 301)):
        got, _, headers = await get(proxy, path)
        assert got == status, path
        assert headers["Strict-Transport-Security"] == "max-age=31536000", path
        assert headers["Cache-Control"] == "public, max-age=60", path  # replaces what S3 said
    resp = await proxy.get("/_admin/stats", headers=AUTH)
    assert "Strict-Transport-Security" not in resp.headers


async def test_stats_and_metrics_report_each_site(make_sites: MakeSites,
                                                  buckets: tuple[Bucket, Bucket, Bucket], shim: Shim) -> None:
    a, b, _ = buckets
    a.put("x.html", b"x")
    b.put("y.html", b"y")
    proxy = await make_sites([{"name": "one", "mount": "/one", "s3": {"bucket": a.name}},
                              {"name": "two", "mount": "/two", "s3": {"bucket": b.name}}])
    await get(proxy, "/one/x.html")
    await settle(proxy)
    await get(proxy, "/one/x.html")
    await get(proxy, "/two/y.html")
    await settle(proxy)
    stats = await (await proxy.get("/_admin/stats", headers=AUTH)).json()
    assert (stats["sites"]["one"]["hits"], stats["sites"]["one"]["misses"]) == (1, 1)
    assert (stats["sites"]["two"]["hits"], stats["sites"]["two"]["misses"]) == (0, 1)
    assert stats["sites"]["one"]["responses"] == {"HIT": 1, "MISS": 1, "REVALIDATED": 0, "STALE": 0}
    assert stats["hits"] == 1 and stats["misses"] == 2
    metrics = await (await proxy.get("/_admin/metrics", headers=AUTH)).text()
    hits: dict[str, float] = collections.Counter()
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "cachingproxy_cache_hits_total":
                hits[sample.labels["site"]] += sample.value
            if sample.name.startswith("cachingproxy_request_duration_seconds"):
                assert "site" in sample.labels
    assert hits == {"one": 1.0, "two": 0.0, "-": 0.0}


# -- refusing to start ------------------------------------------------------------------------------------------


def site(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "s3": {"bucket": "b"}, **extra}


@pytest.mark.parametrize(("sites", "problem"), [
    pytest.param([site("a"), site("a", mount="/x")], "two sites are named 'a'", id="duplicate-name"),
    pytest.param([site("a", hosts=["h.corp"]), site("b", hosts=["H.corp"])], "'a' and 'b' both claim host 'h.corp'",
                 id="same-host-and-mount"),
    pytest.param([site("a"), site("b")], "'a' and 'b' both claim host '(any)'", id="two-catch-alls"),
    pytest.param([{"name": "a"}], "sites.a.s3.bucket: is required", id="no-bucket"),
    pytest.param([site("a", mount="docs")], "sites.a.mount: must start with '/'", id="relative-mount"),
    pytest.param([site("a", colour="red")], "sites[0].colour: unknown key", id="unknown-site-key"),
    pytest.param([{"name": "a", "s3": {"bucket": "b", "buckit": "c"}}], "sites.a.s3.buckit: unknown key",
                 id="unknown-s3-key"),
    pytest.param([site("a", cache={"directory": "/x"})], "sites.a.cache.directory: is global",
                 id="global-cache-key"),
    pytest.param([site("A")], "sites[0].name: is required", id="bad-name"),
    pytest.param([site("a", hosts=["bad host"])], "is not a host name", id="bad-host"),
])
def test_refuses_to_start_with_one_line_per_problem(sites: list[dict[str, Any]], problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"sites": sites})
    assert problem in str(raised.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"sites": [site("a"), site("a", mount="/x"), {"name": "c"}]})
    lines = str(raised.value).splitlines()
    assert len(lines) == 2 and all(line.startswith("config.toml: ") for line in lines)


def test_a_profile_that_does_not_exist_is_named() -> None:
    config = parse_config({"sites": [site("a", s3={"bucket": "b", "profile": "minio"})]})
    assert profile_problems([s.s3 for s in config.sites]) == [
        "s3.profile: 'minio' is not a profile in the AWS config files"]


def test_without_sites_the_old_form_is_one_site_named_default() -> None:
    config = parse_config({"server": {"mount": "/docs"}, "s3": {"bucket": "b", "prefix": "p/"},
                           "cache": {"ttl": 5}, "admin": {"warm_prefixes": ["guides/"]}})
    (only,) = config.sites
    assert (only.name, only.mount, only.hosts, only.s3.bucket, only.s3.prefix, only.cache.ttl,
            only.warm_prefixes) == ("default", "/docs", (), "b", "p/", 5.0, ("guides/",))


def test_site_settings_override_the_top_level_ones_for_that_site_only() -> None:
    config = parse_config({"s3": {"region": "eu-west-1", "bucket": "top"}, "cache": {"ttl": 300},
                           "sites": [site("a", cache={"ttl": 60}), site("b", mount="/b")]})
    a, b = config.sites
    assert (a.cache.ttl, b.cache.ttl, a.s3.region, b.s3.region, a.s3.bucket) == (60.0, 300.0, "eu-west-1",
                                                                                "eu-west-1", "b")
    assert re.fullmatch(r"/b", b.mount)


async def test_the_command_line_client_takes_a_site(make_sites: MakeSites,
                                                    buckets: tuple[Bucket, Bucket, Bucket]) -> None:
    a, b, _ = buckets
    a.put("guides/x.html", b"x")
    b.put("guides/y.html", b"y")
    proxy = await make_sites([{"name": "left", "mount": "/left", "s3": {"bucket": a.name}},
                              {"name": "right", "mount": "/right", "s3": {"bucket": b.name}}])
    where = f"http://127.0.0.1:{proxy.port}"
    code, _, err = await run_cli("warm", "guides/", "--url", where, token=TOKEN)
    assert code == 2 and 'say which site: send "site" as one of left, right' in err
    code, out, err = await run_cli("warm", "guides/", "--site", "right", "--url", where, token=TOKEN)
    assert code == 0, err
    assert (await get(proxy, "/right/guides/y.html"))[2]["X-Cache"] == "HIT"
    code, out, err = await run_cli("purge", "--all", "--site", "right", "--url", where, token=TOKEN)
    assert code == 0 and re.search(r"removed\s+1\b", out), out + err
    code, out, err = await run_cli("stats", "--url", where, token=TOKEN)
    assert code == 0 and re.search(r"^  left\s+hit ratio", out, flags=re.MULTILINE), out

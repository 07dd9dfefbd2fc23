"""Access control per site (issue 14): allow lists, bcrypt htpasswd, both; checked before the cache for every
method and path, failing closed. The pure rules are tables; the rest runs over real sockets against moto."""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from cachingproxy.__main__ import main
from cachingproxy.access import VERIFIED_TTL, SiteAccess, load_all
from cachingproxy.access_rules import (
    basic_credentials,
    client_address,
    in_networks,
    parse_htpasswd,
    parse_networks,
    private_cache_control,
)
from cachingproxy.app import create_app, server_kwargs
from cachingproxy.config import ConfigError, parse_config

from .conftest import Bucket, FakeClock, until
from .shim import Shim

S3 = {"addressing_style": "path", "max_attempts": 1, "connect_timeout": 5.0, "read_timeout": 10.0,
      "request_timeout": 15.0}
# Cost 4: the cheapest bcrypt, so the suite stays fast; the format is what matters here.
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
GOOD = "Basic " + base64.b64encode(b"ana:s3cret").decode()
BAD = "Basic " + base64.b64encode(b"ana:guess").decode()


# -- pure rules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "cidrs", "inside"), [
    ("10.20.3.4", ["10.20.0.0/16"], True),
    ("10.21.3.4", ["10.20.0.0/16"], False),
    ("::ffff:192.168.7.9", ["192.168.7.0/24"], True),  # IPv4 on a dual-stack socket
    ("fd00::1", ["fd00::/8"], True),
    ("not-an-address", ["0.0.0.0/0"], False),  # fail closed
    ("127.0.0.1", [], False),
])
def test_addresses_in_networks(address: str, cidrs: list[str], inside: bool) -> None:
    assert in_networks(address, parse_networks(cidrs)) is inside


@pytest.mark.parametrize("bad", ["10.1.2.3/8", "10.0.0.0/33", "office", ""])
def test_a_bad_network_is_refused_not_widened(bad: str) -> None:
    with pytest.raises(ValueError, match="not an address or CIDR"):
        parse_networks([bad])


TRUSTED = parse_networks(["10.0.0.0/8"])


@pytest.mark.parametrize(("peer", "xff", "client"), [
    ("203.0.113.5", ["1.2.3.4"], "203.0.113.5"),  # untrusted peer: X-Forwarded-For ignored (spoofing)
    ("10.0.0.2", ["1.2.3.4"], "1.2.3.4"),
    ("10.0.0.2", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # right-most untrusted: the left part may be forged
    ("10.0.0.2", ["6.6.6.6, 1.2.3.4, 10.9.9.9"], "1.2.3.4"),  # a chain of trusted proxies
    ("10.0.0.2", ["6.6.6.6", "1.2.3.4"], "1.2.3.4"),  # two header lines are one list
    ("10.0.0.2", ["10.1.1.1"], "10.1.1.1"),  # all trusted: the left-most known
    ("10.0.0.2", ["garbage, 10.1.1.1"], "10.1.1.1"),  # stops at the trusted hop that wrote the junk
    ("10.0.0.2", [], "10.0.0.2"),
])
def test_client_address_believes_only_trusted_proxies(peer: str, xff: list[str], client: str) -> None:
    assert client_address(peer, xff, TRUSTED) == client


@pytest.mark.parametrize(("line", "problem"), [
    ("ana:$apr1$abc$0123456789012345678901", "MD5 ($apr1$)"),
    ("ana:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA1 ({SHA})"),
    ("ana:$6$salt$hash", "SHA512-crypt"),
    ("ana:abJnggxhB/yWI", "not bcrypt"),  # crypt(3)
    ("ana:s3cret", "not bcrypt"),  # plain text
    ("no colon here", "is not user:hash"),
])
def test_htpasswd_formats_other_than_bcrypt_are_refused_with_the_line_number(line: str, problem: str) -> None:
    users, problems = parse_htpasswd(f"# users\n\nbob:{HASH}\n{line}\n")
    assert list(users) == ["bob"]
    assert [(p.line, problem in p.problem) for p in problems] == [(4, True)]


def test_htpasswd_accepts_apache_2y_and_library_2b() -> None:
    users, problems = parse_htpasswd(f"a:{HASH.replace('$2b$', '$2y$')}\nb:{HASH}\n")
    assert problems == [] and set(users) == {"a", "b"}


@pytest.mark.parametrize(("header", "expected"), [
    (GOOD, ("ana", b"s3cret")),
    ("basic " + base64.b64encode(b"ana:a:b").decode(), ("ana", b"a:b")),
    ("Bearer abc", None),
    ("Basic !!!", None),
    ("Basic " + base64.b64encode(b"nocolon").decode(), None),
    (None, None),
])
def test_basic_credentials(header: str | None, expected: tuple[str, bytes] | None) -> None:
    assert basic_credentials(header) == expected


@pytest.mark.parametrize(("s3", "sent"), [
    (None, "private"),
    ("public, max-age=60", "private, max-age=60"),
    ("max-age=60, s-maxage=600", "private, max-age=60"),
    ("no-cache", "private, no-cache"),
    ("private, max-age=5", "private, max-age=5"),
])
def test_protected_responses_are_private(s3: str | None, sent: str) -> None:
    """RFC 9111 §5.2.2.7: `private` keeps shared caches between the proxy and the reader from storing it."""
    assert private_cache_control(s3) == sent


async def test_a_verification_is_remembered_for_a_while_and_failures_never() -> None:
    now = [0.0]
    access = SiteAccess("handbook", (), {"ana": HASH.encode()}, clock=lambda: now[0])
    assert await access.refusal("1.2.3.4", GOOD) is None
    access.users = {}  # bcrypt would now fail: only the remembered verification can let this through
    assert await access.refusal("1.2.3.4", GOOD) is None
    now[0] += VERIFIED_TTL + 1
    refusal = await access.refusal("1.2.3.4", GOOD)
    assert refusal is not None and (refusal.status, refusal.realm) == (401, "handbook")
    access.users = {"ana": HASH.encode()}
    assert (await access.refusal("1.2.3.4", BAD)) is not None
    assert len(access._verified) == 1  # the failure left nothing behind


def test_cached_verification_costs_microseconds_not_a_bcrypt() -> None:
    """The figure for the report: a cached check against one bcrypt at the default cost (12)."""
    import asyncio

    access = SiteAccess("handbook", (), {"ana": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(12))})

    async def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        assert await access.refusal("1.2.3.4", GOOD) is None
        first = time.perf_counter() - t0
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            await access.refusal("1.2.3.4", GOOD)
        return first, (time.perf_counter() - t0) / n

    first, cached = asyncio.run(run())
    print(f"\nbcrypt cost 12: first check {first * 1000:.1f} ms, cached check {cached * 1e6:.2f} us")
    assert cached * 100 < first


# -- over sockets ---------------------------------------------------------------------------------------------


def config(tmp_path: Path, shim: Shim, bucket: Bucket, access: dict[str, Any], **server: Any) -> Any:
    return parse_config({
        "server": server,
        "s3": {"endpoint_url": shim.url, **S3}, "cache": {"directory": str(tmp_path / "cache"), "ttl": 60},
        "sites": [{"name": "handbook", "mount": "/hb", "s3": {"bucket": bucket.name}, "access": access},
                  {"name": "open", "mount": "/open", "s3": {"bucket": bucket.name}}],
    }, "test")


async def start(aiohttp_client: Any, cfg: Any, clock: FakeClock) -> TestClient[Any, Any]:
    server = TestServer(create_app(cfg, clock=clock))
    await server.start_server(**server_kwargs(cfg))
    client: TestClient[Any, Any] = await aiohttp_client(server)
    return client


@pytest.fixture
def htpasswd(tmp_path: Path) -> str:
    path = tmp_path / "handbook.htpasswd"
    path.write_text(f"ana:{HASH}\n")
    return str(path)


# An existing object, a missing one, a folder that redirects (S3 website style), HEAD, and a method that
# would be 405: each must be refused before anything about the bucket is looked up or revealed.
PROBES = [("GET", "/hb/page.html"), ("GET", "/hb/missing.html"), ("GET", "/hb/guide"), ("HEAD", "/hb/page.html"),
          ("POST", "/hb/page.html")]


async def probe(proxy: TestClient[Any, Any], **headers: str) -> list[tuple[int, str, str]]:
    seen = []
    for method, path in PROBES:
        resp = await proxy.request(method, path, headers=headers, allow_redirects=False)
        await resp.read()
        seen.append((resp.status, resp.headers.get("WWW-Authenticate", ""), resp.headers.get("Cache-Control", "")))
    return seen


@pytest.fixture
def seeded(bucket: Bucket) -> Bucket:
    bucket.put("page.html", b"<p>hb</p>", ContentType="text/html", CacheControl="public, max-age=60")
    bucket.put("guide/index.html", b"<p>guide</p>", ContentType="text/html")
    return bucket


async def test_outside_allow_gets_403_before_any_lookup(aiohttp_client: Any, tmp_path: Path, shim: Shim,
                                                         seeded: Bucket, clock: FakeClock) -> None:
    proxy = await start(aiohttp_client, config(tmp_path, shim, seeded, {"allow": ["10.20.0.0/16"]}), clock)
    shim.reset_counts()
    assert [status for status, _, _ in await probe(proxy)] == [403] * len(PROBES)
    assert sum(shim.counts.values()) == 0  # refused before the cache and S3
    resp = await proxy.get("/open/page.html")  # the other site stays open
    assert resp.status == 200 and resp.headers["Cache-Control"] == "public, max-age=60"


async def test_inside_allow_is_served_private(aiohttp_client: Any, tmp_path: Path, shim: Shim, seeded: Bucket,
                                               clock: FakeClock) -> None:
    proxy = await start(aiohttp_client, config(tmp_path, shim, seeded, {"allow": ["127.0.0.0/8", "::1/128"]}),
                        clock)
    assert [(s, c) for s, _, c in await probe(proxy)][:3] == [
        (200, "private, max-age=60"), (404, "private, max-age=10"), (301, "private, no-store")]


async def test_htpasswd_asks_for_credentials_everywhere(aiohttp_client: Any, tmp_path: Path, shim: Shim,
                                                        seeded: Bucket, clock: FakeClock, htpasswd: str) -> None:
    proxy = await start(aiohttp_client, config(tmp_path, shim, seeded, {"htpasswd": htpasswd}), clock)
    shim.reset_counts()
    challenge = 'Basic realm="handbook", charset="UTF-8"'
    for headers in ({}, {"Authorization": BAD}, {"Authorization": "Basic garbage"}):
        assert [(s, w) for s, w, _ in await probe(proxy, **headers)] == [(401, challenge)] * len(PROBES)
    assert sum(shim.counts.values()) == 0
    served = await probe(proxy, Authorization=GOOD)
    assert [s for s, _, _ in served] == [200, 404, 301, 200, 405]
    assert served[0][2] == "private, max-age=60"


async def test_both_rules_are_required(aiohttp_client: Any, tmp_path: Path, shim: Shim, seeded: Bucket,
                                       clock: FakeClock, htpasswd: str) -> None:
    inside = await start(aiohttp_client, config(tmp_path, shim, seeded,
                                                {"allow": ["127.0.0.0/8"], "htpasswd": htpasswd}), clock)
    assert (await inside.get("/hb/page.html")).status == 401
    assert (await inside.get("/hb/page.html", headers={"Authorization": GOOD})).status == 200
    outside = await start(aiohttp_client, config(tmp_path / "b", shim, seeded,
                                                 {"allow": ["10.0.0.0/8"], "htpasswd": htpasswd}), clock)
    resp = await outside.get("/hb/page.html", headers={"Authorization": GOOD})
    assert resp.status == 403 and "WWW-Authenticate" not in resp.headers


# -- failing closed -------------------------------------------------------------------------------------------


def test_an_invalid_cidr_refuses_the_config() -> None:
    with pytest.raises(ConfigError, match=r"sites.hb.access.allow: '10.0.0.1/8' is not an address"):
        parse_config({"sites": [{"name": "hb", "s3": {"bucket": "b"}, "access": {"allow": ["10.0.0.1/8"]}}]})


@pytest.mark.parametrize(("content", "expected"), [
    (None, "file not found"),
    (f"ana:{HASH}\nbob:$apr1$x$0123456789012345678901\n", "line 2: MD5 ($apr1$)"),
    ("# nobody\n", "no users"),
])
def test_htpasswd_problems_refuse_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           content: str | None, expected: str) -> None:
    path = tmp_path / "users.htpasswd"
    if content is not None:
        path.write_text(content)
    toml = tmp_path / "config.toml"
    toml.write_text(f'[[sites]]\nname = "hb"\n[sites.s3]\nbucket = "b"\n[sites.access]\nhtpasswd = "{path}"\n')
    assert main(["serve", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and expected in err
    assert load_all(parse_config({"sites": [{"name": "hb", "s3": {"bucket": "b"},
                                             "access": {"htpasswd": str(path)}}]}))


# -- trusted proxies ------------------------------------------------------------------------------------------


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


async def start_logged(aiohttp_client: Any, cfg: Any, clock: FakeClock, lines: Lines) -> TestClient[Any, Any]:
    logger = logging.getLogger(f"test.access.forwarded.{id(lines)}")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    server = TestServer(create_app(cfg, clock=clock))
    await server.start_server(**server_kwargs(cfg), access_log=logger)
    client: TestClient[Any, Any] = await aiohttp_client(server)
    return client


async def get_logged(proxy: TestClient[Any, Any], lines: Lines, path: str, **headers: str) -> tuple[int, str]:
    """Status, and the client address the access log wrote for it (one connection per request, so the
    line is complete when the connection is)."""
    before = len(lines.lines)
    resp = await proxy.get(path, headers={"Connection": "close", **headers}, allow_redirects=False)
    await resp.read()
    await until(lambda: len(lines.lines) > before, "the access log line")
    return resp.status, lines.lines[-1]["client"]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(aiohttp_client: Any, tmp_path: Path, shim: Shim,
                                                               seeded: Bucket, clock: FakeClock) -> None:
    """Spoofing: the test's own address (127.0.0.1) is not a trusted proxy, so claiming to be inside the office
    network in X-Forwarded-For opens nothing, and the log keeps the real peer."""
    lines = Lines()
    cfg = config(tmp_path, shim, seeded, {"allow": ["10.20.0.0/16"]}, trusted_proxies=["10.0.0.0/8"])
    proxy = await start_logged(aiohttp_client, cfg, clock, lines)
    for spoof in ("10.20.1.1", "10.0.0.1, 10.20.1.1"):
        assert await get_logged(proxy, lines, "/hb/page.html", **{"X-Forwarded-For": spoof}) == (403, "127.0.0.1")


async def test_forwarded_for_from_a_trusted_proxy_is_the_client(aiohttp_client: Any, tmp_path: Path, shim: Shim,
                                                                seeded: Bucket, clock: FakeClock) -> None:
    lines = Lines()
    cfg = config(tmp_path, shim, seeded, {"allow": ["10.20.0.0/16"]}, trusted_proxies=["127.0.0.0/8"])
    proxy = await start_logged(aiohttp_client, cfg, clock, lines)
    xff = {"X-Forwarded-For": "10.20.1.1"}
    assert await get_logged(proxy, lines, "/hb/page.html", **xff) == (200, "10.20.1.1")
    # The right-most untrusted entry decides: whatever the client wrote left of it is not believed.
    forged = {"X-Forwarded-For": "10.20.1.1, 203.0.113.9"}
    assert await get_logged(proxy, lines, "/hb/page.html", **forged) == (403, "203.0.113.9")
    assert await get_logged(proxy, lines, "/open/page.html") == (200, "127.0.0.1")


async def test_forwarded_host_routes_only_from_a_trusted_proxy(aiohttp_client: Any, tmp_path: Path, shim: Shim,
                                                               seeded: Bucket, clock: FakeClock) -> None:
    def cfg(trusted: list[str], directory: Path) -> Any:
        return parse_config({
            "server": {"trusted_proxies": trusted},
            "s3": {"endpoint_url": shim.url, **S3}, "cache": {"directory": str(directory), "ttl": 60},
            "sites": [{"name": "hb", "hosts": ["handbook.corp"], "s3": {"bucket": seeded.name}}]}, "test")

    forwarded = {"X-Forwarded-Host": "handbook.corp", "X-Forwarded-Proto": "https"}
    trusting = await start(aiohttp_client, cfg(["127.0.0.1/32"], tmp_path / "a"), clock)
    assert (await trusting.get("/page.html", headers=forwarded)).status == 200
    wary = await start(aiohttp_client, cfg(["10.0.0.0/8"], tmp_path / "b"), clock)
    assert (await wary.get("/page.html", headers=forwarded)).status == 404  # routed by the real Host


# -- cachingproxy check ---------------------------------------------------------------------------------------


def test_check_prints_the_effective_sites(tmp_path: Path, htpasswd: str, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text(f"""
[[sites]]
name = "hb"
hosts = ["handbook.corp"]
[sites.s3]
bucket = "corp-handbook"
[sites.cache]
ttl = 60
[sites.access]
allow = ["10.20.0.0/16"]
htpasswd = "{htpasswd}"
""")
    assert main(["check", "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert f"{toml} is valid" in out
    assert (f"site hb: hosts handbook.corp; mount /; s3://corp-handbook/; ttl 60 s, 0 rules; allow 10.20.0.0/16; "
            f"htpasswd {htpasswd} (1 users)") in out


def test_check_lists_every_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weak = tmp_path / "weak.htpasswd"
    weak.write_text("ana:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    toml = tmp_path / "config.toml"
    toml.write_text(f"""
[server]
tls_certificate = "{tmp_path / 'gone.pem'}"
tls_key = "{tmp_path / 'gone.key'}"
[[sites]]
name = "hb"
[sites.s3]
bucket = "b"
[sites.access]
htpasswd = "{weak}"
""")
    assert main(["check", "--config", str(toml)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"cachingproxy: {weak}: line 1: SHA1 ({{SHA}}): only bcrypt ($2y$/$2b$) is accepted; re-create it with " \
           "`htpasswd -B`" in err
    assert f"cachingproxy: {tmp_path / 'gone.pem'}: file not found (server.tls_certificate)" in err

"""Freshness toward clients (issue 18): pure tables for freshness.py, then Date/Age over sockets under the FakeClock."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest

from cachingproxy.config import CacheRule
from cachingproxy.freshness import (
    REDIRECT_CACHE_CONTROL,
    ClientFreshness,
    age,
    client_freshness,
    not_found_headers,
    redirect_cache_control,
    stored_date,
    toward_client,
)
from cachingproxy.policy import ttl_for

from .conftest import START, Bucket, FakeClock, MakeProxy, service_of
from .shim import Fault, Shim

RULES = (
    CacheRule("_static/**", None, "max-age=31536000, immutable"),
    CacheRule("legacy/**", None, "max-age=60", override=True),
    CacheRule("**.html", 30.0),
)


@pytest.mark.parametrize(("key", "expected"), [
    pytest.param("_static/site.css", ClientFreshness("max-age=31536000, immutable",
                                                     redirect="max-age=31536000, immutable"), id="rule"),
    pytest.param("legacy/a.html", ClientFreshness("max-age=60", override=True, redirect="max-age=60"),
                 id="override-rule"),
    pytest.param("guides/a.html", ClientFreshness("no-cache"), id="ttl-only-rule-is-skipped"),
    pytest.param("x.bin", ClientFreshness("no-cache"), id="default"),
])
def test_client_freshness_first_rule_that_sets_it(key: str, expected: ClientFreshness) -> None:
    assert client_freshness(key, RULES, "no-cache") == expected


def test_ttl_rules_skip_rules_without_a_ttl() -> None:
    assert ttl_for("_static/a.html", RULES, 300.0) == 30.0
    assert ttl_for("_static/a.css", RULES, 300.0) == 300.0


@pytest.mark.parametrize(("s3_headers", "freshness", "expected"), [
    pytest.param((("Content-Type", "text/css"),), ClientFreshness("no-cache"),
                 (("Content-Type", "text/css"), ("Cache-Control", "no-cache")), id="none-from-s3"),
    pytest.param((("Cache-Control", "max-age=5"),), ClientFreshness("no-cache"),
                 (("Cache-Control", "max-age=5"),), id="s3-wins"),
    pytest.param((("Expires", "Thu, 01 Jan 2099 00:00:00 GMT"),), ClientFreshness("no-cache"),
                 (("Expires", "Thu, 01 Jan 2099 00:00:00 GMT"),), id="s3-expires-is-explicit-too-9111-5.3"),
    pytest.param((("Cache-Control", "max-age=5"), ("Expires", "x"), ("Content-Language", "en")),
                 ClientFreshness("max-age=60", override=True),
                 (("Content-Language", "en"), ("Cache-Control", "max-age=60")), id="override-drops-both"),
])
def test_toward_client(s3_headers: tuple[tuple[str, str], ...], freshness: ClientFreshness,
                       expected: tuple[tuple[str, str], ...]) -> None:
    assert toward_client(s3_headers, freshness) == expected


def test_redirects_get_no_store_unless_a_rule_says_otherwise() -> None:
    assert redirect_cache_control("guides", RULES) == REDIRECT_CACHE_CONTROL == "no-store"
    assert redirect_cache_control("_static/img", RULES) == "max-age=31536000, immutable"


@pytest.mark.parametrize(("checked_at", "now", "date", "expected_age"), [
    pytest.param(START, START, START, 0, id="just-fetched"),
    pytest.param(START + 0.9, START + 1.5, START, 1, id="date-plus-age-is-the-current-second"),
    pytest.param(START + 0.2, START + 7.9, START, 7, id="whole-seconds"),
    pytest.param(START, START + 86400 * 3, START, 86400 * 3, id="stale-if-error-days-old"),
    pytest.param(START + 10, START, START + 10, 0, id="clock-stepped-back-never-negative"),
])
def test_stored_date_and_age(checked_at: float, now: float, date: float, expected_age: int) -> None:
    """RFC 9111 §4.2.3/§5.1: Date is when S3 last gave the headers, Age the seconds since, Date+Age = now."""
    assert stored_date(checked_at) == email.utils.formatdate(date, usegmt=True)
    assert age(checked_at, now) == expected_age
    if now >= checked_at:
        assert email.utils.parsedate_to_datetime(stored_date(checked_at)).timestamp() + age(checked_at, now) == \
            int(now)


@pytest.mark.parametrize(("doc", "expected"), [
    pytest.param((("Content-Type", "text/html"), ("Cache-Control", "max-age=600"), ("Expires", "x"),
                  ("Content-Language", "en"), ("Content-Disposition", "inline")),
                 (("Content-Type", "text/html"), ("Content-Language", "en"), ("Cache-Control", "max-age=10"),
                  ("Cache-Status", "cp; fwd=uri-miss; fwd-status=404")), id="error-document"),
    pytest.param((("Content-Encoding", "gzip"),),
                 (("Content-Encoding", "gzip"), ("Content-Type", "binary/octet-stream"),
                  ("Cache-Control", "max-age=10"), ("Cache-Status", "cp; fwd=uri-miss; fwd-status=404")),
                 id="error-document-without-type"),
    pytest.param((), (("Cache-Control", "max-age=10"), ("Cache-Status", "cp; fwd=uri-miss; fwd-status=404")),
                 id="plain"),
])
def test_not_found_header_set(doc: tuple[tuple[str, str], ...], expected: tuple[tuple[str, str], ...]) -> None:
    """A 404 carries no validator, no Accept-Ranges and no lifetime but negative_ttl (RFC 9110 §13.2.1)."""
    got = not_found_headers(doc, 10.0, "cp")
    assert got == expected
    assert not {"etag", "last-modified", "accept-ranges", "age"} & {name.lower() for name, _ in got}


# -- over sockets ---------------------------------------------------------------------------------------------

def _date(resp: Any) -> float:
    return email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp()


async def test_hits_carry_the_stored_date_and_age(make_proxy: MakeProxy, bucket: Bucket, shim: Shim,
                                                  clock: FakeClock) -> None:
    etag = bucket.put("a.css", b"body{}", ContentType="text/css")
    proxy = await make_proxy()
    miss = await proxy.get("/docs/a.css")
    assert (miss.headers["X-Cache"], miss.headers["Age"], miss.headers["Cache-Control"]) == ("MISS", "0", "no-cache")
    await miss.read()
    await service_of(proxy).settle()
    clock.advance(7.5)
    for method in ("GET", "HEAD"):
        hit = await proxy.request(method, "/docs/a.css")
        assert hit.headers["X-Cache"] == "HIT"
        assert (_date(hit), hit.headers["Age"]) == (START, "7"), method  # not the current time beside Age 7
    # A 304 says the same (RFC 9110 §15.4.5), with the caching headers a 200 would have.
    not_modified = await proxy.get("/docs/a.css", headers={"If-None-Match": etag})
    assert not_modified.status == 304
    assert (_date(not_modified), not_modified.headers["Age"]) == (START, "7")
    assert not_modified.headers["Cache-Control"] == "no-cache"
    # Past the TTL a revalidation with the same ETag resets both.
    clock.advance(60)
    again = await proxy.get("/docs/a.css")
    assert again.headers["X-Cache"] == "REVALIDATED"
    assert (_date(again), again.headers["Age"]) == (int(START + 67.5), "0")
    clock.advance(3)
    hit = await proxy.get("/docs/a.css")
    assert (_date(hit), hit.headers["Age"]) == (int(START + 67.5), "3")
    # During an outage, the stale copy tells its true age.
    shim.fault = Fault(status=503, code="SlowDown")
    clock.advance(100)
    stale = await proxy.get("/docs/a.css")
    assert stale.headers["X-Cache"] == "STALE" and await stale.read() == b"body{}"
    assert (_date(stale), stale.headers["Age"]) == (int(START + 67.5), "103")


async def test_rules_choose_what_browsers_are_told(make_proxy: MakeProxy, bucket: Bucket) -> None:
    bucket.put("_static/a.css", b"a")
    bucket.put("_static/b.css", b"b", CacheControl="max-age=5")
    bucket.put("legacy/c.css", b"c", CacheControl="max-age=5", Expires="Thu, 01 Jan 2099 00:00:00 GMT")
    bucket.put("page.html", b"p", CacheControl="max-age=60")
    rules = [{"match": "_static/**", "client_cache_control": "max-age=31536000, immutable"},
             {"match": "legacy/**", "client_cache_control": "no-cache", "override": True}]
    proxy = await make_proxy(cache={"rules": rules, "client_cache_control": "max-age=0, must-revalidate"})
    expected = {"_static/a.css": "max-age=31536000, immutable", "_static/b.css": "max-age=5",
                "legacy/c.css": "no-cache", "page.html": "max-age=60"}
    for key, control in expected.items():
        for _ in ("MISS", "HIT"):
            resp = await proxy.get("/docs/" + key)
            assert resp.headers["Cache-Control"] == control, key
            assert "Expires" not in resp.headers or key != "legacy/c.css"
    bucket.put("other.txt", b"o")
    resp = await proxy.get("/docs/other.txt")
    assert resp.headers["Cache-Control"] == "max-age=0, must-revalidate"


async def test_website_redirects_say_how_long_to_keep_them(make_proxy: MakeProxy, bucket: Bucket) -> None:
    """An object stored as a redirect (x-amz-website-redirect-location) is a redirect like `dir` -> `dir/`."""
    bucket.put("old.html", b"", WebsiteRedirectLocation="/new.html")
    bucket.put("_static/old.css", b"", WebsiteRedirectLocation="/_static/new.css")
    proxy = await make_proxy(cache={"rules": [{"match": "_static/**", "client_cache_control": "max-age=600"}]})
    for path, control in (("/docs/old.html", "no-store"), ("/docs/_static/old.css", "max-age=600")):
        for _ in ("MISS", "HIT"):
            resp = await proxy.get(path, allow_redirects=False)
            assert (resp.status, resp.headers["Cache-Control"]) == (301, control), path
            await service_of(proxy).settle()

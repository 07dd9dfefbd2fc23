"""REDbot, the HTTP linter, against a live proxy over HTTP (issue 18).

The sample docs site is served through the proxy (moto behind the fault shim) and REDbot checks: the site root,
an HTML page, CSS, JavaScript, a real image, a folder redirect, a 404 with and without an error document, a hit
older than 5 s and a stale response served during an S3 outage. REDbot makes, per URL, the request itself and
its If-None-Match, If-Modified-Since, Range and gzip subrequests (tests/redbot_driver.py runs them all in one
process). Any BAD or WARN note fails the test unless ALLOWED lists it with the reason it is wrong for us.

The proxy's clock is real time plus an offset the test sets: REDbot compares Date with its own clock (5 s
tolerance), so a hit "older than 5 s" is made by filling the cache with the clock set back, not by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

import cachingproxy
from cachingproxy.app import create_app, server_kwargs
from cachingproxy.appkeys import SITES

from .conftest import Bucket, config_for, service_of, until
from .shim import Fault, Shim

PREFIX = "site/"
DRIVER = Path(__file__).with_name("redbot_driver.py")
SITE = Path(cachingproxy.__file__).with_name("sample_site")
# As `make demo` uploads the site: explicit types, and HTML with its own Cache-Control (the publisher's
# choice), the rest without one (the case where the proxy's client_cache_control speaks).
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8", ".json": "application/json",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
HTML_CACHE_CONTROL = "max-age=60"
TTL = 60.0
PUBLISHED = "Mon, 01 Jan 2024 00:00:00 GMT"

# (label or "*", REDbot note id) -> why the note does not apply to this proxy. Keep it short and justified.
ALLOWED: dict[tuple[str, str], str] = {}


class OffsetClock:
    """Real time plus `offset` seconds: REDbot checks Date against its own clock, so a FakeClock fixed in the
    past would be reported as a wrong server clock; the offset still lets the test age entries without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _seed(bucket: Bucket) -> None:
    for path in sorted(SITE.rglob("*")):
        if path.is_file():
            extra = {"ContentType": TYPES.get(path.suffix, "application/octet-stream")}
            if path.suffix == ".html":
                extra["CacheControl"] = HTML_CACHE_CONTROL
            bucket.put(PREFIX + path.relative_to(SITE).as_posix(), path.read_bytes(), **extra)


async def _proxy(aiohttp_client: Any, tmp_path: Path, shim: Shim, bucket: Bucket, clock: OffsetClock,
                 name: str, *, listing: bool = False, **cache: Any) -> TestClient[Any, Any]:
    config = config_for(tmp_path, shim.url, bucket.name, s3={"prefix": PREFIX},
                        cache={"directory": str(tmp_path / name), "ttl": TTL, **cache})
    if listing:  # one [[sites]] entry, which is where folder listings are switched on
        config = replace(config, sites=tuple(replace(site, listing=True) for site in config.sites))
    server = TestServer(create_app(config, clock=clock))
    await server.start_server(**server_kwargs(config))
    client: TestClient[Any, Any] = await aiohttp_client(server)
    return client


async def _redbot(urls: dict[str, str]) -> dict[str, dict[str, Any]]:
    """REDbot's results by label; a subprocess, since it runs its own event loop (thor)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, str(DRIVER), *urls.values(),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    results = json.loads(out)
    return {label: results[url] for label, url in urls.items()}


async def _warm(client: TestClient[Any, Any], path: str) -> None:
    resp = await client.get(path)
    await resp.read()
    assert resp.status == 200, path
    await service_of(client).settle()


async def test_redbot_finds_nothing_wrong(aiohttp_client: Any, tmp_path: Path, shim: Shim, bucket: Bucket) -> None:
    _seed(bucket)
    clock = OffsetClock()
    proxy = await _proxy(aiohttp_client, tmp_path, shim, bucket, clock, "cache", error_document="404.html")
    plain = await _proxy(aiohttp_client, tmp_path, shim, bucket, clock, "cache-plain", listing=True)

    # Published long ago: moto stamps Last-Modified with the upload time, which would be later than the Date
    # of a response the proxy says it got from S3 20 s ago (REDbot: LM_FUTURE).
    shim.fault = Fault(last_modified=PUBLISHED)
    # Cached 90 s ago (30 s past the TTL: what an outage serves stale), and 20 s ago (a fresh hit, Age 20).
    clock.offset = -(TTL + 30)
    await _warm(proxy, "/docs/reference/index.html")
    clock.offset = -20
    await _warm(proxy, "/docs/guides/advanced/tuning.html")
    clock.offset = 0
    # Compressed: the CSS is cached and its variants made, so REDbot's gzip subrequest gets the gzip variant.
    await _warm(proxy, "/docs/_static/site.css")
    css = proxy.app[SITES].first
    entry = await css.store.lookup(PREFIX + "_static/site.css")
    assert entry is not None
    await until(lambda: "gzip" in (css.variants.present(PREFIX + "_static/site.css", entry.meta.etag) or ()),
                "the CSS's variants")

    def url(client: TestClient[Any, Any], path: str) -> str:
        return f"http://127.0.0.1:{client.port}{path}"

    urls = {
        "root": url(proxy, "/docs/"),
        "html": url(proxy, "/docs/guides/install.html"),
        "css": url(proxy, "/docs/_static/site.css"),
        "js": url(proxy, "/docs/_static/site.js"),
        "image": url(proxy, "/docs/_static/diagram.png"),
        "folder redirect": url(proxy, "/docs/guides"),
        "404 error document": url(proxy, "/docs/nope.html"),
        "404 plain": url(plain, "/docs/nope.html"),
        "folder listing": url(plain, "/docs/_static/"),
        "hit 20 s old": url(proxy, "/docs/guides/advanced/tuning.html"),
    }
    results = await _redbot(urls)
    # S3 down: every request for the expired page is answered from the cache, STALE.
    shim.fault = Fault(status=503, code="ServiceUnavailable", last_modified=PUBLISHED)
    stale = {"stale during outage": url(proxy, "/docs/reference/index.html")}
    results.update(await _redbot(stale))
    shim.fault = None

    expected = {"root": 200, "html": 200, "css": 200, "js": 200, "image": 200, "folder redirect": 301,
                "404 error document": 404, "404 plain": 404, "folder listing": 200, "hit 20 s old": 200,
                "stale during outage": 200}
    assert {label: r["status"] for label, r in results.items()} == expected, results
    complaints = []
    for label, result in results.items():
        assert result["error"] is None, (label, result["error"])
        for note in result["notes"]:
            if note["level"] in ("BAD", "WARN") and not ({(label, note["id"]), ("*", note["id"])} & set(ALLOWED)):
                complaints.append(f"{label}: {note['level']} {note['id']}: {note['summary']}")
    print(json.dumps({label: [f"{n['level']} {n['id']}" for n in r["notes"]] for label, r in results.items()},
                     indent=1))
    assert not complaints, "\n".join(complaints)
    # The checks that matter really ran: the conditional and range subrequests on a 200, and the ages.
    ids = {label: {note["id"] for note in r["notes"]} for label, r in results.items()}
    assert {"INM_304", "IMS_304", "RANGE_CORRECT", "DATE_CORRECT"} <= ids["css"], ids["css"]
    assert "CONNEG_GZIP_GOOD" in ids["css"], ids["css"]  # gzip from its variant, Vary and ETag right
    assert "CURRENT_AGE" in ids["hit 20 s old"] and "DATE_CORRECT" in ids["hit 20 s old"]
    assert "CURRENT_AGE" in ids["stale during outage"] and "DATE_CORRECT" in ids["stale during outage"]
    assert shim.counts["HEAD"] > 0  # the outage was real: the stale page's revalidations reached the shim

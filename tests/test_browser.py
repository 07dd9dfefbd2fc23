"""End to end: Debian's headless chromium reads the shipped sample docs site through the proxy, in front of
moto behind the counting shim, as a reader would, and checks what the browser itself saw.

One chromium for the session (tests/browser.py, fresh user-data dir), driven with Playwright's async API;
each test gets its own browser context (empty HTTP cache), proxy (empty cache directory) and shim (zeroed
counts). The bucket is seeded once per module with `seed_bucket`: the tests only read it. The home page's
screenshot is saved as test-output/browser/home.png (and copied to docs/ with UPDATE_SCREENSHOT=1).

The whole module is skipped, with the reason, when /usr/bin/chromium is missing (.ci/install-browser.sh
installs it) or does not start; `pytest -rs` prints the reason in the summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio

from cachingproxy.appkeys import SITES
from cachingproxy.demo import seed_bucket

from . import browser as chromium
from .browser import fresh_context, new_page
from .conftest import Bucket, MakeProxy, ProxyClient, service_of
from .shim import Shim

_reason = chromium.missing_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Page  # noqa: E402

pytest_plugins = ["tests.browser"]  # the session's one chromium (`chromium_browser`)
pytestmark = pytest.mark.asyncio(loop_scope=chromium.LOOP)

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "test-output" / "browser" / "home.png"
README_SCREENSHOT = REPO / "docs" / "screenshot-home.png"  # refreshed only with UPDATE_SCREENSHOT=1
BRAND = "rgb(31, 78, 121)"  # #1f4e79, header background in site.css
DOWNLOAD = "downloads/handbook.zip"
# Links in the site that name a folder without its trailing slash.
FOLDER_LINKS = ["guides/advanced", "reference", "reference/api"]


@dataclass
class Site:
    proxy: ProxyClient  # the real app on a real socket
    shim: Shim
    objects: dict[str, bytes]  # what seed_bucket uploaded, by key

    def url(self, relative: str) -> str:
        return str(self.proxy.make_url("/docs/" + quote(relative)))

    def pages(self) -> list[str]:
        return sorted(k for k in self.objects if k.endswith(".html") and k != "404.html")

    def page_urls(self) -> dict[str, str]:
        """Every page by its key, and folders' index pages also as `folder/`: {relative URL: key}."""
        urls = {}
        for key in self.pages():
            urls[key] = key
            if key.endswith("index.html"):
                urls[key.removesuffix("index.html")] = key
        return urls

    def reader_urls(self) -> list[str]:
        """Every page once, as the site's own links name it (`folder/` rather than `folder/index.html`)."""
        return [key.removesuffix("index.html") for key in self.pages()]

    async def settle(self) -> None:
        """Wait for the proxy's background cache fills to land (an event, not a sleep)."""
        await service_of(self.proxy).settle()


# The tests and the fixtures that start the proxy and the shim run on the session loop, the loop of the one
# chromium that tests/browser.py's plugin starts (see its docstring).
shim = pytest_asyncio.fixture(loop_scope=chromium.LOOP, name="shim")(chromium.shim_on_loop)
aiohttp_client = pytest_asyncio.fixture(loop_scope=chromium.LOOP, name="aiohttp_client")(chromium.client_on_loop)


@pytest.fixture(scope="module")
def bucket(s3_client: Any) -> Bucket:
    """One bucket for the module (read-only here), so the 8 MB sample site is uploaded once."""
    bucket = Bucket(s3_client, f"t-{uuid.uuid4().hex[:16]}")
    s3_client.create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture(scope="module")
def seeded(moto_url: str, bucket: Bucket) -> dict[str, bytes]:
    return seed_bucket(moto_url, bucket.name, prefix="")


@pytest_asyncio.fixture(loop_scope=chromium.LOOP)
async def site(make_proxy: MakeProxy, seeded: dict[str, bytes], shim: Shim) -> Site:
    proxy = await make_proxy(cache={"error_document": "404.html"})
    shim.reset_counts()
    return Site(proxy=proxy, shim=shim, objects=seeded)


@pytest_asyncio.fixture(loop_scope=chromium.LOOP)
async def browser(site: Site, chromium_browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh context per test; set up after (so closed before) the proxy it talks to."""
    context = await fresh_context(chromium_browser)
    try:
        yield context
    finally:
        await context.close()


async def styled(page: Page) -> tuple[str, str | None]:
    """The header's computed background and whether site.js ran: both prove relative asset URLs resolved."""
    result: list[Any] = await page.evaluate(
        """() => [getComputedStyle(document.querySelector('header')).backgroundColor,
                  document.documentElement.dataset.js ?? null]""")
    return result[0], result[1]


async def broken_images(page: Page) -> list[str]:
    broken: list[str] = await page.evaluate(
        "() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    return broken


async def visit(page: Page, url: str) -> int:
    """Load a page like a reader: wait for `load`, and on the search page for its fetched index."""
    response = await page.goto(url)
    assert response is not None, url
    if "search.html" in url:
        await page.wait_for_selector('#results[data-loaded="true"], #results[data-error]', state="attached")
    return response.status


# -- the tests -----------------------------------------------------------------------------------------
# Every test also asserts that no request failed and that every sub-resource got 2xx or 304
# (`traffic.problems()`), from the browser's own network events.


async def test_every_page_loads_with_all_subresources(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    urls = site.page_urls()
    assert len(site.pages()) >= 10
    seen_types = set()
    for relative, key in urls.items():
        traffic.clear()
        assert await visit(page, site.url(relative)) == 200, relative
        assert await page.title() == chromium.page_title(site.objects[key]), relative
        assert await styled(page) == (BRAND, "ok"), relative
        assert await broken_images(page) == [], relative
        assert traffic.problems() == [], relative
        assert traffic.subresources(), relative
        seen_types |= {r.resource_type for r in traffic.subresources()}
    assert {"stylesheet", "script", "image", "fetch"} <= seen_types


async def test_stylesheet_applied_and_script_ran(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    assert await visit(page, site.url("guides/advanced/tuning.html")) == 200  # ../../_static/site.css
    color, js = await styled(page)
    assert color == BRAND
    assert js == "ok"
    css = [r for r in traffic.responses if r.url.endswith("/docs/_static/site.css")]
    assert [r.status for r in css] == [200]
    assert css[0].headers["content-type"] == "text/css; charset=utf-8"
    assert traffic.problems() == []


async def test_folder_link_without_slash_lands_on_folder_slash(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    for href in FOLDER_LINKS:
        assert await visit(page, site.url("")) == 200
        traffic.clear()
        await page.locator(f'nav.sidebar a[href="{href}"]').click()
        await page.wait_for_url(site.url(href + "/"))  # waits for the `load` event
        assert page.url.endswith(f"/docs/{href}/"), href
        redirects = [r for r in traffic.responses if r.resource_type == "document" and r.redirect]
        assert [(r.status, r.headers.get("location")) for r in redirects] == [(301, f"/docs/{href}/")]
        assert await styled(page) == (BRAND, "ok"), href
        assert await broken_images(page) == [], href
        # site.js marks the sidebar link for this page: relative links now resolve against `folder/`.
        current = await page.locator("nav.sidebar a.current").get_attribute("href")
        assert current is not None and current.rstrip("/").endswith(href), (href, current)
        assert traffic.problems() == [], href
        assert any(r.url.endswith("/docs/_static/site.css") for r in traffic.responses), href


async def test_search_page_fetches_its_json_index(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    assert await visit(page, site.url("search.html") + "?q=deploy") == 200
    results = page.locator('#results[data-loaded="true"] > li')
    index = json.loads(site.objects["search-index.json"])
    expected = [p["title"] for p in index["pages"]
                if "deploy" in f'{p["title"]} {p["section"]} {p["summary"]}'.lower()]
    assert expected
    assert await results.locator("a").all_inner_texts() == expected
    assert await page.get_attribute("#results", "data-error") is None
    fetched = [r for r in traffic.responses if r.resource_type == "fetch"]
    assert [(r.url, r.status) for r in fetched] == [(site.url("search-index.json"), 200)]
    assert fetched[0].headers["content-type"] == "application/json"
    assert traffic.problems() == []
    # The rendered results are live links relative to search.html.
    traffic.clear()
    await results.first.locator("a").click()
    await page.wait_for_url(re.compile(r".*/docs/(?!search\.html).*"))
    assert await page.title() != "Search — Acme Platform Handbook"
    assert await styled(page) == (BRAND, "ok")
    assert traffic.problems() == []


async def test_page_with_space_and_accent_loads_via_its_link(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    assert await visit(page, site.url("guides/")) == 200
    traffic.clear()
    await page.locator("main").get_by_role("link", name="Café menu").click()
    await page.wait_for_url(site.url("guides/café menu.html"))
    assert page.url.endswith("/docs/guides/caf%C3%A9%20menu.html")
    documents = [r for r in traffic.responses if r.resource_type == "document"]
    assert [r.status for r in documents] == [200]
    assert await page.locator("h1").inner_text() == "Café menu"
    assert "Crème brûlée" in await page.locator("main").inner_text()  # UTF-8 decoded, not mojibake
    assert await styled(page) == (BRAND, "ok")
    assert traffic.problems() == []


async def test_missing_page_shows_the_404_page(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    for relative in ["no-such-page.html", "guides/advanced/gone.html", "reference/nothing-here"]:
        traffic.clear()
        response = await page.goto(site.url(relative))
        assert response is not None
        assert response.status == 404, relative
        assert await page.title() == chromium.page_title(site.objects["404.html"]), relative
        assert await page.locator("h1").inner_text() == "Page not found"
        bar = await page.evaluate("() => getComputedStyle(document.querySelector('.bar')).backgroundColor")
        assert bar == BRAND  # the 404 page's own inline styles, valid at any depth
        assert traffic.problems() == [], relative


async def test_second_visit_is_served_from_the_cache(site: Site, browser: BrowserContext) -> None:
    urls = [*site.reader_urls(), "guides/advanced", "search.html?q=cache", "no-such-page.html"]

    async def read_site(context: BrowserContext) -> chromium.Traffic:
        page, traffic = await new_page(context)
        for relative in urls:
            path, _, query = relative.partition("?")
            await visit(page, site.url(path) + (f"?{query}" if query else ""))
        await page.close()
        return traffic

    first = await read_site(browser)
    assert first.problems() == []
    assert {r.headers.get("x-cache") for r in first.responses} >= {"MISS"}
    assert site.shim.counts["GET"] > 0
    await site.settle()
    site.shim.reset_counts()

    assert browser.browser is not None
    fresh = await fresh_context(browser.browser)  # an empty browser cache: every request reaches the proxy
    try:
        second = await read_site(fresh)
    finally:
        await fresh.close()
    assert second.problems() == []
    assert site.shim.counts == {}, site.shim.log  # zero S3 requests
    # A 404 describes the requested URL, not the error document it shows: no X-Cache (issue 18); the
    # zero S3 requests above already prove its absence and its page came from the cache.
    not_hit = [(r.status, r.url, r.headers.get("x-cache")) for r in second.responses
               if not (r.status == 301 and r.redirect) and r.status != 404 and r.headers.get("x-cache") != "HIT"]
    assert not_hit == []
    assert {r.headers.get("cache-status") for r in second.responses if r.status == 404} == \
        {"cachingproxy; fwd=uri-miss; fwd-status=404"}
    assert {r.resource_type for r in second.responses} >= {"document", "stylesheet", "script", "image", "fetch"}
    assert {r.status for r in second.responses} - {304} == {200, 301, 404}


async def test_download_streams_in_full(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    assert await visit(page, site.url("")) == 200
    await site.settle()
    site.shim.reset_counts()
    seeded = site.objects[DOWNLOAD]
    assert len(seeded) > 4 * 1024 * 1024
    # First through fetch() in the page: a cold key, streamed from S3 while the cache fills.
    status, size, digest, x_cache = await page.evaluate(
        """async (url) => {
            const r = await fetch(url);
            const body = await r.arrayBuffer();
            const hash = await crypto.subtle.digest('SHA-256', body);
            const hex = [...new Uint8Array(hash)].map(b => b.toString(16).padStart(2, '0')).join('');
            return [r.status, body.byteLength, hex, r.headers.get('x-cache')];
        }""",
        DOWNLOAD,
    )
    assert (status, size, x_cache) == (200, len(seeded), "MISS")
    assert digest == hashlib.sha256(seeded).hexdigest()
    assert site.shim.log == [("GET", DOWNLOAD)]
    assert traffic.problems() == []
    await site.settle()
    site.shim.reset_counts()
    # Then as a reader gets it: clicking the link saves the file (now from the proxy's cache).
    async with page.expect_download() as info:
        await page.locator("a.download").click()
    download = await info.value
    saved = await download.path()
    assert await download.failure() is None
    assert download.suggested_filename == "handbook.zip"
    assert saved.stat().st_size == len(seeded)
    assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(seeded).digest()
    # Chromium hands a navigation that turns out to be a download to its download manager and reports the
    # page's request as aborted; that handover is the only "failure" allowed here.
    assert traffic.failures == [f"GET {site.url(DOWNLOAD)}: net::ERR_ABORTED"]
    assert site.shim.counts == {}


async def test_screenshot_of_the_home_page(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    assert await visit(page, site.url("")) == 200
    await page.evaluate("() => document.fonts.ready.then(() => true)")
    assert await styled(page) == (BRAND, "ok")
    assert traffic.problems() == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    png = await page.screenshot(path=SCREENSHOT)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (chromium.VIEWPORT["width"], chromium.VIEWPORT["height"])
    assert SCREENSHOT.read_bytes() == png
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SCREENSHOT, README_SCREENSHOT)


async def test_mount_without_slash_lands_on_mount_slash(site: Site, browser: BrowserContext) -> None:
    page, traffic = await new_page(browser)
    assert await visit(page, str(site.proxy.make_url("/docs"))) == 200
    assert page.url == site.url("")
    assert await styled(page) == (BRAND, "ok")
    assert traffic.problems() == []


async def layout(page: Page) -> list[Any]:
    """Every element's tag, box and the computed styles that show: what a reader sees, as values."""
    boxes: list[Any] = await page.evaluate(
        """() => [...document.querySelectorAll('*')].map(e => {
             const r = e.getBoundingClientRect(), s = getComputedStyle(e);
             return [e.tagName, r.x, r.y, r.width, r.height, s.color, s.backgroundColor, s.fontFamily, s.fontSize,
                     s.display];
           })""")
    return boxes


async def test_the_site_renders_identically_with_br(site: Site, chromium_browser: Browser) -> None:
    """The home page read with identity bodies, then again once every page and asset has its variants and the
    browser asks for br: chromium decodes our brotli itself, and the render is the same: every element's box
    and computed style (screenshots differ now and then by a few anti-aliased pixels, for identity twice too)."""
    renders = []
    for accept in ("identity", "br"):
        context = await fresh_context(chromium_browser)
        try:
            # Chromium offers br only over HTTPS; the header is set here, the decoding is still the browser's.
            await context.set_extra_http_headers({"Accept-Encoding": accept})
            page, traffic = await new_page(context)
            for relative in ("guides/advanced/tuning.html", ""):
                assert await visit(page, site.url(relative)) == 200
            await page.evaluate("() => document.fonts.ready.then(() => true)")
            assert await styled(page) == (BRAND, "ok")
            assert traffic.problems() == []
            codings = {r.url.rsplit("/docs/", 1)[1]: r.headers.get("content-encoding") for r in traffic.responses}
            renders.append((await layout(page), await page.content(), codings))
        finally:
            await context.close()
        await site.settle()
        await site.proxy.app[SITES].first.variants.wait()
    (identity_layout, identity_dom, identity_codings), (br_layout, br_dom, br_codings) = renders
    assert set(identity_codings.values()) == {None}
    # Each compressible object of 1 KiB or more came as br (the CSS, the page); the PNG never does.
    assert br_codings["_static/site.css"] == "br" and br_codings[""] == "br"
    assert br_codings["_static/diagram.png"] is None
    assert br_dom == identity_dom
    assert br_layout == identity_layout

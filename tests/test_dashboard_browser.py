"""The admin dashboard (`GET /_admin/`) in Debian's headless chromium: an operator logs in with the token, reads
figures that must match `GET /_admin/stats` and the S3 requests counted at the shim, watches them refresh, and
warms a prefix from the page until the job shows as done.

Same setup as tests/test_browser.py: the session's one chromium (tests/browser.py), a fresh browser context per
test, the real app on a real socket in front of the counting shim and moto. Skipped with the reason when
/usr/bin/chromium is missing or does not start.

The page is read through the ids it has (`#token`, `#hit-ratio`, `#jobs tr[data-id]`...) and the raw numbers it
keeps in `data-value`, so a change of wording or number format does not break the test, but a wrong figure does.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from cachingproxy.counters import COUNTERS

from . import browser as chromium
from .browser import fresh_context, new_page
from .conftest import Bucket, MakeProxy, ProxyClient, service_of
from .shim import Shim

_reason = chromium.missing_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page  # noqa: E402

pytest_plugins = ["tests.browser"]  # the session's one chromium (`chromium_browser`)
pytestmark = pytest.mark.asyncio(loop_scope=chromium.LOOP)

shim = pytest_asyncio.fixture(loop_scope=chromium.LOOP, name="shim")(chromium.shim_on_loop)
aiohttp_client = pytest_asyncio.fixture(loop_scope=chromium.LOOP, name="aiohttp_client")(chromium.client_on_loop)

TOKEN = "dashboard-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OBJECTS = {
    "index.html": b"<h1>Home</h1>",
    "guides/index.html": b"<h1>Guides</h1>" * 40,
    "guides/install.html": b"<h1>Install</h1>" * 300,
    "guides/advanced/tuning.html": b"<h1>Tuning</h1>" * 7000,
    "reference/index.html": b"<h1>Reference</h1>" * 3,
}
GUIDES = sorted(k for k in OBJECTS if k.startswith("guides/"))


@dataclass
class Admin:
    proxy: ProxyClient  # the real app (admin on) on a real socket
    shim: Shim

    def url(self, path: str) -> str:
        return str(self.proxy.make_url(path))

    async def get_object(self, key: str) -> str:
        """Read one object through the proxy, as a reader would; returns its X-Cache."""
        resp = await self.proxy.get("/docs/" + key)
        assert resp.status == 200, key
        assert await resp.read() == OBJECTS[key], key
        x_cache: str = resp.headers["X-Cache"]
        await service_of(self.proxy).settle()  # the cache fill has landed (an event, not a sleep)
        return x_cache

    async def api(self, path: str) -> dict[str, Any]:
        resp = await self.proxy.get("/_admin/" + path, headers=AUTH)
        assert resp.status == 200, path
        body: dict[str, Any] = await resp.json()
        return body


@pytest_asyncio.fixture(loop_scope=chromium.LOOP)
async def admin(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> Admin:
    for key, body in OBJECTS.items():
        bucket.put(key, body, ContentType="text/html; charset=utf-8")
    proxy = await make_proxy(admin={"token": TOKEN})
    return Admin(proxy=proxy, shim=shim)


@pytest_asyncio.fixture(loop_scope=chromium.LOOP)
async def browser(admin: Admin, chromium_browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh context per test (empty sessionStorage: logged out); closed before the proxy it talks to."""
    context = await fresh_context(chromium_browser)
    try:
        yield context
    finally:
        await context.close()


class Console:
    """The page's console errors and uncaught exceptions; a CSP that blocked the inline script shows up here."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.favicon: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error":
            return
        # The page declares no icon, so chromium asks for /favicon.ico, which is outside the proxy's mount
        # (404). That is the browser's own request, not the dashboard's; it is kept apart.
        if msg.location.get("url", "").endswith("/favicon.ico"):
            self.favicon.append(msg.text)
        else:
            self.errors.append(f"{msg.text} ({msg.location.get('url')})")


async def open_dashboard(admin: Admin, context: BrowserContext) -> tuple[Page, chromium.Traffic, Console]:
    """Open `/_admin` as an operator types it (no slash): the page must land on `/_admin/` with its login form."""
    page, traffic = await new_page(context)
    console = Console(page)
    response = await page.goto(admin.url("/_admin"))
    assert response is not None and response.status == 200
    assert page.url == admin.url("/_admin/")
    assert await page.locator("#login").is_visible()
    assert await page.locator("#dashboard").is_hidden()
    return page, traffic, console


async def log_in(page: Page, token: str) -> int:
    """Type the token into the login form and submit it; returns the status of the page's first /stats."""
    await page.locator("#token").fill(token)
    async with page.expect_response(lambda r: r.url.endswith("/_admin/stats")) as info:
        await page.locator("#login-form button[type=submit]").click()
    response = await info.value
    status: int = response.status
    return status


async def shown(page: Page) -> dict[str, str]:
    """Each figure's `data-value` (the raw number) and the text the operator reads, by element id."""
    values: dict[str, str] = await page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll('#dashboard [id]')].flatMap(el => [
            [el.id, el.textContent], [el.id + '@value', el.dataset.value ?? '']]))""")
    return values


async def figures_refreshed(page: Page, expected_saved: int) -> None:
    """Wait until the page's own refresh shows `expected_saved` (a DOM condition, not a sleep)."""
    await page.wait_for_function(
        "n => document.getElementById('s3-saved')?.dataset.value === String(n)", arg=expected_saved)


def assert_figures_match(figures: dict[str, str], stats: dict[str, Any]) -> None:
    """What the dashboard shows is what /stats says."""
    assert float(figures["hit-ratio@value"]) == stats["hit_ratio"]
    assert figures["hit-ratio"] == f"{stats['hit_ratio'] * 100:.1f}%"
    r = stats["responses"]
    assert figures["responses"] == (f"{r['HIT']} hit, {r['REVALIDATED']} revalidated, {r['STALE']} stale, "
                                    f"{r['MISS']} miss")
    assert int(figures["s3-saved@value"]) == stats["s3_requests_saved"]
    assert figures["s3-saved"] == str(stats["s3_requests_saved"])
    q = stats["s3_requests"]
    assert figures["s3-requests"].startswith(f"made: {q['GET']} GET, {q['HEAD']} HEAD, {q['LIST']} LIST;")
    assert int(figures["cache-entries@value"]) == stats["entries"]
    assert re.search(rf", {stats['entries']} objects$", figures["cache-entries"]), figures["cache-entries"]
    assert int(figures["cache-fill@value"]) == stats["bytes_on_disk"]
    assert figures["cache-fill"] == f"{stats['bytes_on_disk'] / stats['size_limit'] * 100:.1f}%"
    assert figures["s3-status@value"] == stats["s3"] == "ok"
    assert figures["s3-status"] == "reachable"
    assert int(figures["stale-served@value"]) == stats["stale_served"]
    assert figures["error"] == ""


async def assert_every_counter_listed(page: Page, stats: dict[str, Any]) -> None:
    """The "Every counter" table has one row per declared counter, with its /stats value."""
    rows: list[list[str]] = await page.evaluate("""() => [...document.querySelectorAll('#counters tr')].map(
        tr => [tr.dataset.counter, ...[...tr.cells].map(td => td.textContent)])""")
    assert [row[0] for row in rows] == [c.name for c in COUNTERS]
    by_name = {c["name"]: c for c in stats["counters"]}
    for name, section, help_text, shown_value in rows:
        assert (section, help_text) == (by_name[name]["section"], by_name[name]["help"])
        if by_name[name]["unit"] != "bytes":
            assert shown_value == str(by_name[name]["value"])


def assert_stats_match_shim(stats: dict[str, Any], shim: Shim) -> None:
    """/stats counts the S3 requests the shim saw, by operation."""
    assert stats["s3_requests"] == {op: shim.counts.get(op, 0) for op in ("GET", "HEAD", "LIST")}, shim.log


# -- the tests -----------------------------------------------------------------------------------------


async def test_a_wrong_token_is_refused_and_shows_nothing(admin: Admin, browser: BrowserContext) -> None:
    page, traffic, console = await open_dashboard(admin, browser)
    assert await log_in(page, "not-the-token") == 401
    await page.locator("#login-error").filter(has_text="The token was rejected.").wait_for()
    assert await page.locator("#login").is_visible()
    assert await page.locator("#dashboard").is_hidden()
    assert await page.locator("#hit-ratio").inner_text() == "–"  # never rendered
    assert await page.evaluate("() => sessionStorage.length") == 0  # the rejected token is forgotten
    assert await page.locator("#jobs tr").count() == 0
    assert admin.shim.counts == {}  # nothing happened behind the page
    # The page's API calls (stats, and warm jobs fetched alongside) were all refused; chromium logs each 401 as a
    # console error, and nothing else.
    refused = {r.url: r.status for r in traffic.subresources()}
    assert set(refused.values()) == {401}
    assert admin.url("/_admin/stats") in refused
    assert set(refused) <= {admin.url("/_admin/stats"), admin.url("/_admin/warm")}
    assert traffic.failures == []
    assert [e for e in console.errors if "status of 401" not in e] == []


async def test_figures_match_stats_and_refresh(admin: Admin, browser: BrowserContext) -> None:
    keys = ["index.html", "guides/index.html", "guides/install.html", "reference/index.html"]
    assert [await admin.get_object(k) for k in keys] == ["MISS"] * 4
    assert [await admin.get_object(k) for k in keys] == ["HIT"] * 4
    page, traffic, console = await open_dashboard(admin, browser)
    assert await log_in(page, TOKEN) == 200
    await figures_refreshed(page, 4)
    assert await page.locator("#login").is_hidden()

    stats = await admin.api("stats")
    assert (stats["responses"]["MISS"], stats["responses"]["HIT"], stats["entries"]) == (4, 4, 4)
    assert stats["hit_ratio"] == 0.5
    assert stats["bytes_on_disk"] > sum(len(OBJECTS[k]) for k in keys)
    assert_stats_match_shim(stats, admin.shim)
    assert admin.shim.counts["GET"] == 4
    assert_figures_match(await shown(page), stats)
    await assert_every_counter_listed(page, stats)
    sites = await page.evaluate("""() => [...document.querySelectorAll('#sites tr')].map(
        tr => [tr.dataset.site, ...[...tr.cells].map(td => td.textContent)])""")
    q = stats["s3_requests"]
    assert sites == [["default", "default", "50.0%", "4 hit, 0 revalidated, 0 stale, 4 miss",
                      f"{q['GET']} GET, {q['HEAD']} HEAD, {q['LIST']} LIST", "reachable"]]

    # The page refreshes itself: two more hits show up without a reload.
    assert [await admin.get_object(k) for k in keys[:2]] == ["HIT"] * 2
    await figures_refreshed(page, 6)
    stats = await admin.api("stats")
    assert stats["hit_ratio"] == 0.6
    assert_stats_match_shim(stats, admin.shim)
    assert_figures_match(await shown(page), stats)

    # The token lives for the tab: a reload goes straight to the figures.
    async with page.expect_response(lambda r: r.url.endswith("/_admin/stats")):
        await page.reload()
    await figures_refreshed(page, 6)
    assert await page.locator("#login").is_hidden()
    assert traffic.problems() == []
    assert console.errors == []


async def test_warm_started_from_the_page_completes(admin: Admin, browser: BrowserContext) -> None:
    assert await admin.get_object("index.html") == "MISS"  # something outside the prefix is already cached
    page, traffic, console = await open_dashboard(admin, browser)
    assert await log_in(page, TOKEN) == 200
    await figures_refreshed(page, 0)
    admin.shim.reset_counts()

    async def warm_from_page(prefix: str) -> dict[str, Any]:
        """Start a warm with the page's form; wait until its row says done; return the job as the API has it."""
        await page.locator("#warm-prefix").fill(prefix)
        async with page.expect_response(lambda r: r.url.endswith("/_admin/warm")
                                        and r.request.method == "POST") as info:
            await page.locator("#warm-start").click()
        started = await info.value
        assert started.status == 202
        job_id: str = (await started.json())["id"]
        message = page.locator("#warm-message")
        await message.filter(has_text=f"Started {job_id}").wait_for()
        assert await message.get_attribute("data-id") == job_id
        row = page.locator(f'#jobs tr[data-id="{job_id}"]')
        await row.locator("td").last.filter(has_text=re.compile(r"^done$")).wait_for()
        job = await admin.api(f"warm/{job_id}")
        assert job["done"] and job["error"] is None
        cells = await row.locator("td").all_inner_texts()
        assert cells[0] == prefix
        assert [int(c.rstrip("+")) for c in cells[2:6]] == [job["listed"], job["fetched"], job["skipped"],
                                                            job["failed"]]
        assert not cells[2].endswith("+")  # listing finished
        progress = row.locator("progress")
        assert await progress.evaluate("p => [p.value, p.max]") == [job["listed"], job["listed"]]
        return job

    first = await warm_from_page("guides/")
    assert (first["listed"], first["fetched"], first["skipped"], first["failed"]) == (len(GUIDES), len(GUIDES), 0, 0)
    assert first["bytes"] == sum(len(OBJECTS[k]) for k in GUIDES)
    assert sorted(key for op, key in admin.shim.log if op == "GET") == GUIDES  # each object fetched once
    assert admin.shim.counts["LIST"] >= 1

    # The warmed objects are served from the cache without asking S3.
    admin.shim.reset_counts()
    assert [await admin.get_object(k) for k in GUIDES] == ["HIT"] * len(GUIDES)
    assert admin.shim.counts == {}

    # A second warm of the unchanged prefix fetches nothing: only LIST requests, every object unchanged.
    second = await warm_from_page("guides/")
    assert second["id"] != first["id"]
    assert (second["listed"], second["fetched"], second["skipped"], second["failed"]) == (len(GUIDES), 0,
                                                                                          len(GUIDES), 0)
    assert set(admin.shim.counts) == {"LIST"}
    assert await page.locator("#jobs tr").count() == 2  # both jobs listed, newest first
    assert await page.locator("#jobs tr").first.get_attribute("data-id") == second["id"]

    # The S3 figures catch up with both warms (the LISTs above) on the page's own refresh.
    stats = await admin.api("stats")
    q = stats["s3_requests"]
    await page.wait_for_function("t => document.getElementById('s3-requests').textContent.startsWith(t)",
                                 arg=f"made: {q['GET']} GET, {q['HEAD']} HEAD, {q['LIST']} LIST;")
    assert_figures_match(await shown(page), stats)
    assert traffic.problems() == []
    assert console.errors == []

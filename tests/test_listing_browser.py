"""A folder listing (`listing = true`) with hostile object names, in Debian's headless chromium: no script from
a name runs, every name shows as text, and each link opens the object it names.

Same setup as tests/test_browser.py: the session's one chromium, a fresh context per test, the real app on a
real socket in front of the counting shim and moto. Skipped with the reason when chromium is missing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cachingproxy.app import create_app, server_kwargs
from cachingproxy.config import parse_config

from . import browser as chromium
from .browser import fresh_context, new_page
from .conftest import Bucket
from .shim import Shim

_reason = chromium.missing_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Dialog  # noqa: E402

pytest_plugins = ["tests.browser"]
pytestmark = pytest.mark.asyncio(loop_scope=chromium.LOOP)

shim = pytest_asyncio.fixture(loop_scope=chromium.LOOP, name="shim")(chromium.shim_on_loop)
aiohttp_client = pytest_asyncio.fixture(loop_scope=chromium.LOOP, name="aiohttp_client")(chromium.client_on_loop)

# Names a publisher (or an attacker with write access to one prefix) could give objects.
OBJECTS = {
    '<img src=x onerror="window.pwned=1">.html': b"<p>img</p>",
    "<svg onload=window.pwned=2>.html": b"<p>svg</p>",
    "a b+c%25&amp;.html": b"<p>spaces</p>",
    "café.html": b"<p>cafe</p>",
    "javascript:window.pwned=3.html": b"<p>scheme</p>",
    'quote".html': b"<p>quote</p>",
}


@pytest_asyncio.fixture(loop_scope=chromium.LOOP)
async def browser(chromium_browser: Browser) -> AsyncIterator[BrowserContext]:
    context = await fresh_context(chromium_browser)
    try:
        yield context
    finally:
        await context.close()


async def test_a_listing_of_hostile_names_runs_no_script_and_links_to_each_object(
        aiohttp_client: Any, tmp_path: Path, bucket: Bucket, shim: Shim, browser: BrowserContext) -> None:
    for name, body in OBJECTS.items():
        bucket.put("files/" + name, body, ContentType="text/html; charset=utf-8")
    config = parse_config({
        "s3": {"endpoint_url": shim.url, "addressing_style": "path", "max_attempts": 1},
        "cache": {"directory": str(tmp_path / "cache")},
        "sites": [{"name": "files", "mount": "/files", "listing": True, "s3": {"bucket": bucket.name,
                                                                                "prefix": "files/"}}],
    })
    proxy = await aiohttp_client(create_app(config), server_kwargs=server_kwargs(config))
    page, traffic = await new_page(browser)
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)

    page.on("dialog", on_dialog)
    listing = str(proxy.make_url("/files/"))
    resp = await page.goto(listing)
    assert resp is not None and resp.status == 200
    shown = await page.evaluate("() => [...document.querySelectorAll('tbody a')].map(a => a.textContent)")
    assert sorted(shown) == sorted(["../", *OBJECTS])
    assert await page.evaluate("() => window.pwned") is None
    assert await page.evaluate("() => document.querySelectorAll('img, svg, script').length") == 0
    for name, body in OBJECTS.items():
        await page.goto(listing)
        async with page.expect_navigation():
            await page.get_by_text(name, exact=True).click()
        assert await page.evaluate("() => document.body.innerHTML") == body.decode()
        assert await page.evaluate("() => window.pwned") is None
    assert dialogs == []
    assert not traffic.problems(), traffic.problems()

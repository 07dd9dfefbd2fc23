"""Helpers for tests/test_browser.py: Debian's chromium, driven by Playwright's async API.

The browser is the system package (`.ci/install-browser.sh` installs it with apt); Playwright is only the
driver, pointed at it with `executable_path`. `playwright install` is never run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "Seen",
    "Traffic",
    "launch",
    "missing_reason",
    "page_title",
    "startup_failure",
]

CHROMIUM = Path("/usr/bin/chromium")
# Loopback only: nothing that phones home, no QUIC, no GPU, no first-run UI.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
VIEWPORT = {"width": 1280, "height": 800}
INSTALL_HINT = "run .ci/install-browser.sh (apt-get install chromium); `make test` does"
STARTUP_TIMEOUT = 60.0


def missing_reason() -> str | None:
    """Why the browser tests cannot run at all, checked without starting anything; None if they can."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"browser tests skipped: {CHROMIUM} is not installed ({INSTALL_HINT})"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError as exc:
        return f"browser tests skipped: the Playwright driver is not importable ({exc}); pip install -e '.[test]'"
    return None


async def launch(playwright: Any, user_data_dir: Path) -> Any:
    """A chromium BrowserContext on a fresh profile in `user_data_dir`."""
    return await playwright.chromium.launch_persistent_context(
        user_data_dir=str(user_data_dir),
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        headless=True,
        viewport=VIEWPORT,
        accept_downloads=True,
        timeout=STARTUP_TIMEOUT * 1000,
    )


async def _probe() -> str:
    from playwright.async_api import async_playwright

    profile = tempfile.mkdtemp(prefix="chromium-probe-")
    try:
        async with async_playwright() as pw:
            context = await launch(pw, Path(profile))
            try:
                page = await context.new_page()
                await page.set_content("<p id=ok>ok</p>")
                text: str = await page.inner_text("#ok")
                return text
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def startup_failure() -> str | None:
    """Start chromium once through the driver; return why it did not start, or None if it did.

    Runs in a thread with its own event loop so that it never touches (or blocks) a test's loop.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chromium-probe") as pool:
        future = pool.submit(asyncio.run, _probe())
        try:
            if future.result(timeout=STARTUP_TIMEOUT + 30) == "ok":
                return None
            return f"browser tests skipped: {CHROMIUM} started but did not render a page"
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return f"browser tests skipped: {CHROMIUM} did not start under Playwright: {first}"


def page_title(body: bytes) -> str:
    """The <title> of a page as the browser shows it."""
    found = re.search(rb"<title>(.*?)</title>", body, re.S)
    assert found is not None
    return html.unescape(found.group(1).decode("utf-8")).strip()


@dataclass(frozen=True)
class Seen:
    url: str
    status: int
    headers: dict[str, str]
    resource_type: str
    redirected: bool  # a 3xx the browser followed


@dataclass
class Traffic:
    """What one page saw on the network, collected from the browser's own events."""

    responses: list[Seen] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> Any:
        page.on("response", self._on_response)
        page.on("requestfailed", self._on_failed)
        return page

    def _on_response(self, response: Any) -> None:
        request = response.request
        self.responses.append(Seen(url=response.url, status=response.status, headers=dict(response.headers),
                                   resource_type=request.resource_type,
                                   redirected=request.redirected_to is not None))

    def _on_failed(self, request: Any) -> None:
        self.failures.append(f"{request.method} {request.url}: {request.failure}")

    def clear(self) -> None:
        self.responses.clear()
        self.failures.clear()

    def subresources(self) -> list[Seen]:
        return [r for r in self.responses if r.resource_type != "document"]

    def problems(self) -> list[str]:
        """Failed requests, and sub-resources answered with anything but 2xx/304."""
        bad = [f"{r.status} {r.url}" for r in self.subresources() if not (200 <= r.status < 300 or r.status == 304)]
        return self.failures + bad

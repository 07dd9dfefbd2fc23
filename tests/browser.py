"""Shared by the browser suites (tests/test_browser.py, tests/test_dashboard_browser.py): Debian's chromium,
driven by Playwright's async API.

The browser is the system package (`.ci/install-browser.sh` installs it with apt); Playwright is only the
driver, pointed at it with `executable_path`. `playwright install` is never run.

This module is also a pytest plugin, loaded by each browser suite with `pytest_plugins = ["tests.browser"]`, so
that its one session-scoped fixture, `chromium_browser`, is defined once: one chromium for the whole run,
however many suites use it. Playwright objects belong to the event loop that created them, so the browser, the
suites' tests and the servers they talk to all run on pytest-asyncio's session loop (`LOOP`); `shim_on_loop`
and `client_on_loop` restate conftest's function-loop `shim` and pytest-aiohttp's `aiohttp_client` on it.

PYTEST_DONT_REWRITE: the suites import this module before pytest loads it as a plugin, too late for assertion
rewriting, which pytest would otherwise warn about (an error under this project's filterwarnings).
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from .conftest import Bucket
from .shim import Shim

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Page

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "LOOP",
    "Seen",
    "Traffic",
    "chromium_browser",
    "client_on_loop",
    "fresh_context",
    "launch",
    "launch_failure",
    "missing_reason",
    "new_page",
    "page_title",
    "shim_on_loop",
]

LOOP: Final = "session"  # pytest-asyncio loop scope of the browser, the suites and their servers
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
    # Any host but localhost and 127.0.0.1 fails to resolve, so a stray external URL fails loudly (requestfailed).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
LOOPBACK = frozenset({"127.0.0.1", "localhost", "[::1]"})
VIEWPORT = {"width": 1280, "height": 800}
INSTALL_HINT = "run .ci/install-browser.sh (apt-get install chromium); `make test` does"
INSTALL_NOTE = Path(__file__).resolve().parents[1] / "test-output" / "browser" / "install-browser.txt"
STARTUP_TIMEOUT = 60.0


def missing_reason() -> str | None:
    """Why the browser tests cannot run at all, checked without starting anything; None if they can."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        why = INSTALL_HINT
        if INSTALL_NOTE.is_file():  # left by .ci/install-browser.sh when apt could not install it
            why = f".ci/install-browser.sh: {INSTALL_NOTE.read_text(encoding='utf-8').strip()}"
        return f"browser tests skipped: {CHROMIUM} is not installed ({why})"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError as exc:
        return f"browser tests skipped: the Playwright driver is not importable ({exc}); pip install -e '.[test]'"
    return None


async def launch(playwright: Any, user_data_dir: Path) -> Any:
    """Start chromium on a fresh profile in `user_data_dir`; returns its (persistent) BrowserContext."""
    return await playwright.chromium.launch_persistent_context(
        user_data_dir=str(user_data_dir),
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        headless=True,
        viewport=VIEWPORT,
        accept_downloads=True,
        timeout=STARTUP_TIMEOUT * 1000,
    )


def launch_failure(exc: BaseException) -> str:
    """The skip reason for a chromium that is installed but does not start: Playwright's first line, plus the
    browser's last stderr line and exit status from its call log (the rest is the full command line)."""
    lines = [line.strip().lstrip("- ") for line in str(exc).strip().splitlines()]
    head = lines[0] if lines and lines[0] else type(exc).__name__
    details = [line for line in lines if "[err]" in line][-1:]
    details += [line for line in lines if "process did exit" in line][-1:]
    return f"browser tests skipped: {CHROMIUM} did not start under Playwright: " + " | ".join([head, *details])[:400]


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

    @property
    def redirect(self) -> bool:
        return 300 <= self.status < 400 and "location" in self.headers


@dataclass
class Traffic:
    """What one page saw on the network, collected from the browser's own events."""

    responses: list[Seen] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)  # icon fetches cancelled by leaving the page
    offsite: list[str] = field(default_factory=list)  # requests for anything but loopback (there must be none)

    def attach(self, page: Any) -> Any:
        page.on("request", self._on_request)
        page.on("response", self._on_response)
        page.on("requestfailed", self._on_failed)
        return page

    def _on_request(self, request: Any) -> None:
        url = urlsplit(request.url)
        if url.scheme not in ("data", "blob") and url.netloc.rpartition(":")[0] not in LOOPBACK:
            self.offsite.append(f"{request.method} {request.url}")

    def _on_response(self, response: Any) -> None:
        request = response.request
        self.responses.append(Seen(url=response.url, status=response.status, headers=dict(response.headers),
                                   resource_type=request.resource_type))

    def _on_failed(self, request: Any) -> None:
        failure = f"{request.method} {request.url}: {request.failure}"
        if request.resource_type == "other" and request.failure == "net::ERR_ABORTED":
            # Chromium fetches a page's <link rel=icon> after `load`; going to the next page cancels it. That
            # is the browser abandoning the request, not the proxy failing it (a cut or short answer shows
            # as another net:: error), so it is kept apart.
            self.abandoned.append(failure)
        else:
            self.failures.append(failure)

    def clear(self) -> None:
        self.responses.clear()
        self.failures.clear()
        self.abandoned.clear()
        self.offsite.clear()

    def subresources(self) -> list[Seen]:
        return [r for r in self.responses if r.resource_type != "document"]

    def problems(self) -> list[str]:
        """Failed requests, sub-resources answered with anything but 2xx/304, and requests beyond loopback."""
        bad = [f"{r.status} {r.url}" for r in self.subresources() if not (200 <= r.status < 300 or r.status == 304)]
        return self.failures + bad + [f"offsite: {r}" for r in self.offsite]


async def fresh_context(browser: Browser) -> BrowserContext:
    """A new browser context: its own empty HTTP cache, cookies and storage."""
    return await browser.new_context(viewport=VIEWPORT, accept_downloads=True)  # type: ignore[arg-type]


async def new_page(context: BrowserContext) -> tuple[Page, Traffic]:
    traffic = Traffic()
    page = traffic.attach(await context.new_page())
    return page, traffic


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope=LOOP)
async def chromium_browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    """One chromium for the session, on a fresh user-data dir. Every test using it is skipped, with the reason,
    if it is missing or cannot start (a failed launch is tried once: pytest caches the fixture's skip)."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        try:
            persistent = await launch(pw, tmp_path_factory.mktemp("chromium-profile"))
        except Exception as exc:
            pytest.skip(launch_failure(exc))
        try:
            assert persistent.browser is not None
            yield persistent.browser
        finally:
            await persistent.close()


async def shim_on_loop(moto_url: str, bucket: Bucket) -> AsyncIterator[Shim]:
    """conftest's `shim`, for a suite to register on `LOOP` (see the module docstring)."""
    s = Shim(moto_url, bucket.name)
    await s.start()
    yield s
    await s.close()


async def client_on_loop() -> AsyncIterator[Callable[..., Awaitable[TestClient[Any, Any]]]]:
    """pytest-aiohttp's `aiohttp_client` (which conftest's `make_proxy` starts the app with), on `LOOP`: it
    takes an app or a started test server, like the original."""
    clients: list[TestClient[Any, Any]] = []

    async def start(target: web.Application | BaseTestServer, *, server_kwargs: dict[str, Any] | None = None,
                    **client_kwargs: Any) -> TestClient[Any, Any]:
        server = TestServer(target, **(server_kwargs or {})) if isinstance(target, web.Application) else target
        client: TestClient[Any, Any] = TestClient(server, **client_kwargs)
        await client.start_server()
        clients.append(client)
        return client

    yield start
    while clients:
        await clients.pop().close()

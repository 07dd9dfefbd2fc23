"""Admin client: `cachingproxy warm | stats | purge` against a running proxy's admin API.

Talks HTTP with aiohttp's client and otherwise uses only the stdlib. Progress goes to stderr (a redrawn bar on a
terminal, one line per change otherwise, so CI logs and pipes stay readable); results go to stdout. The token is
sent only as an `Authorization` header and never printed.

Exit codes: 0 done; 1 a warm finished with failed objects or a failed listing; 2 the proxy could not be asked
(unreachable, token refused, no admin API, bad request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .config import ADMIN_TOKEN_ENV
from .counters import COUNTERS

__all__ = ["CliError", "Progress", "admin_base", "format_bytes", "render_table", "run"]

DEFAULT_ADMIN_PATH = "/_admin"  # AdminConfig.path's default, used when --url names no path
POLL_INTERVAL = 0.5  # seconds between progress polls; a warm job's JSON is a few hundred bytes
REQUEST_TIMEOUT = 30.0
BAR_WIDTH = 24
EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """Anything that stops a command before it has a result; the message is one line for the operator."""


def admin_base(url: str) -> str:
    """`http://host:8080` -> `http://host:8080/_admin`; a URL with a path (own admin port, other path) is kept."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"--url must look like http://host:port, got {url!r}")
    path = parts.path.rstrip("/") or DEFAULT_ADMIN_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


_NUMBER = re.compile(r"^[0-9][0-9.,]*%?(?= |$)")  # a value's leading figure: "12", "66.7%", "1.5 KiB"


def render_table(rows: Sequence[tuple[str, str]], title: str = "") -> str:
    """Two columns under an optional title; leading figures are right-aligned on their last digit."""
    width = max((len(name) for name, _ in rows), default=0)
    digits = max((len(m[0]) for _, value in rows if (m := _NUMBER.match(value))), default=0)
    lines = [title] if title else []
    for name, value in rows:
        figure = _NUMBER.match(value)
        cell = figure[0].rjust(digits) + value[figure.end():] if figure else value
        lines.append(f"  {name.ljust(width)}  {cell}")
    return "\n".join(lines)


# -- progress -------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Draws a warm job's progress: objects and bytes, rate and ETA, measured on this side's clock.

    Our own monotonic clock, not the job's `started`: the proxy's clock may differ from ours, and the rate
    that matters is the one the operator is watching.
    """

    out: TextIO
    tty: bool
    started: float
    _last: str = ""
    _drawn: bool = False

    def line(self, job: dict[str, Any], now: float) -> str:
        done = job["fetched"] + job["skipped"] + job["failed"]
        listed = job["listed"]
        total = f"{listed}" if job["listing_done"] else f"{listed}+"  # "+": still listing, more to come
        elapsed = max(now - self.started, 1e-6)
        rate, byte_rate = done / elapsed, job["processed_bytes"] / elapsed
        share = job["processed_bytes"] / job["listed_bytes"] if job["listed_bytes"] else (1.0 if job["done"] else 0.0)
        if job["done"]:
            eta = "done"
        elif job["listing_done"] and byte_rate > 0:
            eta = "ETA " + format_duration((job["listed_bytes"] - job["processed_bytes"]) / byte_rate)
        else:
            eta = "ETA ?"  # the total is unknown until the listing ends
        filled = int(BAR_WIDTH * min(share, 1.0))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        failed = f", {job['failed']} failed" if job["failed"] else ""
        return (f"[{bar}] {share * 100:3.0f}%  {done}/{total} objects{failed}  "
                f"{format_bytes(job['processed_bytes'])}/{format_bytes(job['listed_bytes'])}  "
                f"{rate:.1f} obj/s  {format_bytes(byte_rate)}/s  {eta}")

    def update(self, job: dict[str, Any], now: float) -> None:
        text = self.line(job, now)
        if self.tty:
            self.out.write("\r" + text + "\x1b[K")  # redraw in place; \x1b[K clears a longer previous line
            self._drawn = True
        elif _without_rates(text) != _without_rates(self._last):
            self.out.write(text + "\n")  # not a terminal: one line per change, never a wall of \r
        self._last = text
        self.out.flush()

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


def _without_rates(line: str) -> str:
    """The part of a progress line that changes only when the job moves (rates and ETA drift with time)."""
    return line.split(" obj/s")[0].rsplit("  ", 1)[0]


# -- talking to the proxy --------------------------------------------------------------------------------------


class Admin:
    """get/post JSON against one admin base URL with the bearer token."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self._session = session
        self._base = base
        self._headers = {"Authorization": f"Bearer {token}"}

    async def get(self, path: str) -> dict[str, Any]:
        return await self._call("GET", path, None)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = self._base + path
        try:
            async with self._session.request(method, url, json=body, headers=self._headers) as resp:
                if resp.status == 401:
                    raise CliError(f"the proxy refused the admin token (set {ADMIN_TOKEN_ENV} or pass --token)")
                if resp.status == 404 and path in ("/stats", "/warm", "/purge"):
                    raise CliError(f"no admin API at {self._base} (is a token configured on the proxy, "
                                   "and is this its admin path or port?)")
                try:
                    data = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    data = None
                if resp.status >= 400:
                    # Our admin API answers errors as {"error": "..."}; anything else is shown by status only.
                    reason = data.get("error") if isinstance(data, dict) else None
                    raise CliError(f"{method} {path}: HTTP {resp.status}" + (f": {reason}" if reason else ""))
                if not isinstance(data, dict):
                    raise CliError(f"{method} {path}: the answer is not JSON (is {self._base} a cachingproxy?)")
                return data
        except aiohttp.ClientConnectionError as exc:
            raise CliError(f"cannot reach {self._base}: {_connection_reason(exc)}") from None
        except TimeoutError:
            raise CliError(f"{self._base} did not answer within {REQUEST_TIMEOUT:.0f} s") from None


def _connection_reason(exc: aiohttp.ClientConnectionError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or exc.__class__.__name__
    return exc.__class__.__name__


async def _session_run(args: argparse.Namespace, command: Any) -> int:
    base = admin_base(args.url)
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        raise CliError(f"no admin token: set {ADMIN_TOKEN_ENV} (or pass --token)")
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        result: int = await command(Admin(session, base, token), args)
        return result


# -- commands -------------------------------------------------------------------------------------------------


def _for_site(body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {**body, "site": args.site} if getattr(args, "site", None) else body


async def _warm(admin: Admin, args: argparse.Namespace) -> int:
    started = await admin.post("/warm", _for_site({"prefix": args.prefix}, args))
    job_id = str(started["id"])
    what = repr(args.prefix) if args.prefix else "everything"
    note = "" if started.get("created", True) else " (joined the warm already running for it)"
    print(f"warm {job_id}: {what}{note}", file=sys.stderr, flush=True)
    progress = Progress(out=sys.stderr, tty=sys.stderr.isatty(), started=time.monotonic())
    try:
        while True:
            job = await admin.get(f"/warm/{job_id}")
            progress.update(job, time.monotonic())
            if job["done"]:
                break
            await asyncio.sleep(POLL_INTERVAL)
    except asyncio.CancelledError:  # Ctrl-C: the job belongs to the proxy, which carries on without us
        progress.finish()
        print(f"stopped watching; warm {job_id} goes on in the proxy", file=sys.stderr)
        raise
    finally:
        progress.finish()  # end a redrawn bar's line, so what follows starts on its own
    print(_warm_summary(job, time.monotonic() - progress.started))
    return EXIT_FAILED if job["failed"] or job["error"] else EXIT_OK


def _warm_summary(job: dict[str, Any], seconds: float) -> str:
    rows = [
        ("listed", f"{job['listed']} ({format_bytes(job['listed_bytes'])})"),
        ("fetched", f"{job['fetched']} ({format_bytes(job['bytes'])})"),
        ("unchanged", str(job["skipped"])),
        ("failed", str(job["failed"])),
    ]
    text = render_table(rows, f"warm {job['id']} of {job['prefix'] or '(everything)'}: "
                              f"{'finished' if job['done'] else 'running'} after {format_duration(seconds)}")
    if job["error"]:
        text += f"\nerror: {job['error']}"
    failures = job["failures"]
    if failures:
        width = max(len(f["key"]) for f in failures)
        text += "\nfailed objects:\n" + "\n".join(f"  {f['key'].ljust(width)}  {f['reason']}" for f in failures)
        if job["failed"] > len(failures):
            text += f"\n  ... and {job['failed'] - len(failures)} more (only the first {len(failures)} are kept)"
    return text


async def _stats(admin: Admin, args: argparse.Namespace) -> int:
    s = await admin.get("/stats")
    if args.json:
        print(json.dumps(s, indent=2))
        return EXIT_OK
    r = s["responses"]
    fill = f" ({s['bytes_on_disk'] / s['size_limit'] * 100:.1f}%)" if s["size_limit"] else ""
    sections: dict[str, list[tuple[str, str]]] = {
        "Responses": [
            ("hit ratio", f"{s['hit_ratio'] * 100:.1f}%"),
            ("HIT", str(r["HIT"])), ("MISS", str(r["MISS"])),
            ("REVALIDATED", str(r["REVALIDATED"])), ("STALE", str(r["STALE"])),
        ],
        "S3": [
            ("reachable", "yes" if s.get("s3") == "ok" else "NO (serving from cache)"),
            ("requests saved", str(s["s3_requests_saved"])),
        ],
        "Cache": [
            ("state", str(s["cache"])),
            ("objects", str(s["entries"])),
            ("on disk", f"{format_bytes(s['bytes_on_disk'])} of {format_bytes(s['size_limit'])}{fill}"),
            ("warm jobs running", str(s["warm_jobs_running"])),
            ("uptime", format_duration(s["uptime"])),
        ],
    }
    sites = s.get("sites", {})
    if len(sites) > 1:
        sections["Sites"] = [
            (name, f"hit ratio {site['hit_ratio'] * 100:.1f}%, {sum(site['responses'].values())} responses, "
                   f"{sum(site['s3_requests'].values())} S3 requests, S3 {site.get('s3', '?')}")
            for name, site in sites.items()]
    for counter in COUNTERS:  # every declared counter, under its section, described by its help text
        value: Any = s
        for part in counter.stats:
            value = value[part]
        shown = format_bytes(value) if counter.unit == "bytes" else str(value)
        sections.setdefault(counter.section, []).append((counter.help.rstrip("."), shown))
    print("\n\n".join(render_table(rows, title) for title, rows in sections.items()))
    return EXIT_OK


async def _purge(admin: Admin, args: argparse.Namespace) -> int:
    if args.all:
        body: dict[str, Any] = {"all": True}
        scope = ("everything", "")
    elif args.key is not None:
        body, scope = {"key": args.key}, ("key", args.key)
    else:
        body, scope = {"prefix": args.prefix}, ("prefix", args.prefix or "(empty: everything)")
    answer = await admin.post("/purge", _for_site(body, args))
    print(render_table([scope, ("removed", str(answer["purged"]))], "purge"))
    return EXIT_OK


COMMANDS = {"warm": _warm, "stats": _stats, "purge": _purge}


def run(args: argparse.Namespace) -> int:
    """Run the client command `args.command`; errors become one line on stderr and exit code 2."""
    try:
        return asyncio.run(_session_run(args, COMMANDS[args.command]))
    except CliError as exc:
        print(f"cachingproxy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130

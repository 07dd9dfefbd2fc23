"""`cachingproxy warm | stats | purge` run as real processes against a live proxy on a real socket."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cachingproxy.admin_client import CliError, Progress, admin_base, format_bytes, render_table
from cachingproxy.config import ADMIN_TOKEN_ENV as TOKEN_ENV
from cachingproxy.counters import COUNTERS

from .conftest import Bucket, MakeProxy, ProxyClient, free_port, service_of
from .shim import Fault, Shim

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cli-t0ken"
DEADLINE = 120  # seconds; a hung command fails the test instead of hanging the suite


async def run_cli(*args: str, token: str | None = TOKEN,
                  on_stderr: Callable[[str], None] | None = None) -> tuple[int, str, str]:
    """Run `python -m cachingproxy ARGS`; `on_stderr` sees each stderr line as it is printed."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "CACHINGPROXY_URL")}
    if token is not None:
        env[TOKEN_ENV] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cachingproxy", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(DEADLINE):
            out = asyncio.ensure_future(proc.stdout.read())
            while line := await proc.stderr.readline():
                lines.append(line.decode())
                if on_stderr is not None:
                    on_stderr(lines[-1])
            code = await proc.wait()
            return code, (await out).decode(), "".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def url(proxy: ProxyClient) -> str:
    return f"http://127.0.0.1:{proxy.port}"


def seed(bucket: Bucket, prefix: str, count: int) -> dict[str, bytes]:
    bodies = {f"{prefix}page-{i:03d}.html": f"<p>page {i}</p>".encode() * (1 + i % 5) for i in range(count)}
    for key, body in bodies.items():
        bucket.put(key, body)
    return bodies


PROGRESS = re.compile(r"^\[[#-]{24}\] +(\d+)%  (\d+)/(\d+)(\+?) objects")


# -- warm -----------------------------------------------------------------------------------------------------


async def test_warm_shows_live_progress_and_exits_0(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bodies = seed(bucket, "guides/", 30)
    total = sum(map(len, bodies.values()))
    # One GET hangs until released, so the command must show a job in progress before it can finish.
    shim.faults["guides/page-007.html"] = Fault(stall_after=0, ops=frozenset({"GET"}))
    proxy = await make_proxy(admin={"token": TOKEN})
    seen: list[tuple[int, int]] = []

    def watch(line: str) -> None:
        match = PROGRESS.match(line)
        if match:
            seen.append((int(match[2]), int(match[3])))
            if (int(match[2]), int(match[3])) == (29, 30):
                shim.release.set()

    code, out, err = await run_cli("warm", "guides/", "--url", url(proxy), on_stderr=watch)
    assert code == 0, err
    assert (29, 30) in seen and seen[-1] == (30, 30)  # a partial state was drawn, then the finished one
    progress = [line for line in err.splitlines() if PROGRESS.match(line)]
    assert "\r" not in err  # stderr is a pipe here: one line per change, no redrawing
    assert all("obj/s" in line and "/s  " in line for line in progress)
    assert any(re.search(r"ETA \d+:\d\d$", line) for line in progress)
    assert progress[-1].startswith("[" + "#" * 24 + "] 100%  30/30 objects")
    assert progress[-1].endswith("done")
    assert re.search(rf"fetched\s+30 \({re.escape(format_bytes(total))}\)", out)
    assert re.search(r"failed\s+0$", out, flags=re.MULTILINE)
    assert TOKEN not in out + err
    assert shim.counts == {"LIST": 1, "GET": 30}

    # A second warm of the unchanged prefix: LIST only, reported as unchanged.
    shim.reset_counts()
    code, out, err = await run_cli("warm", "guides/", "--url", url(proxy))
    assert code == 0, err
    assert re.search(r"unchanged\s+30$", out, flags=re.MULTILINE)
    assert shim.counts == {"LIST": 1}


async def test_warm_exits_nonzero_listing_the_failed_objects(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    seed(bucket, "guides/", 5)
    shim.faults["guides/page-003.html"] = Fault(status=500, code="InternalError", ops=frozenset({"GET"}))
    proxy = await make_proxy(admin={"token": TOKEN})
    code, out, err = await run_cli("warm", "--url", url(proxy))  # no prefix: everything
    assert code == 1, err
    assert re.search(r"fetched\s+4 ", out) and re.search(r"failed\s+1$", out, flags=re.MULTILINE)
    assert out.splitlines()[-2:] == [
        "failed objects:", "  guides/page-003.html  S3 unavailable, or the body failed verification"]
    assert [line for line in err.splitlines() if PROGRESS.match(line)][-1].find("1 failed") > 0
    for leak in (bucket.name, "InternalError", str(shim.port)):
        assert leak not in out + err


async def test_warm_exits_nonzero_when_the_listing_fails(make_proxy: MakeProxy, shim: Shim) -> None:
    proxy = await make_proxy(admin={"token": TOKEN})
    await shim.refuse()
    code, out, err = await run_cli("warm", "guides/", "--url", url(proxy))
    assert code == 1, err
    assert "error: listing failed: S3 unavailable" in out


# -- stats and purge ------------------------------------------------------------------------------------------


async def test_stats_prints_tables_that_match_the_api(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put("a.html", b"a" * 2048)
    proxy = await make_proxy(admin={"token": TOKEN})
    for _ in range(3):
        assert len(await (await proxy.get("/docs/a.html")).read()) == 2048
    await service_of(proxy).settle()
    code, out, err = await run_cli("stats", "--url", url(proxy))
    assert code == 0, err
    rows = dict(re.findall(r"^  (\S.*?)  +(\S.*)$", out, flags=re.MULTILINE))
    assert (rows["HIT"], rows["MISS"]) == ("2", "1")
    assert (rows["GetObject requests sent to S3"], rows["HeadObject requests sent to S3"]) == ("1", "0")
    assert rows["hit ratio"] == "66.7%"
    assert rows["requests saved"] == "2"
    assert rows["objects"] == "1"
    assert rows["Object bytes sent to clients in complete responses"] == "6.0 KiB"
    assert rows["ListObjectsV2 requests sent to S3"] == "1"  # the reachability check behind the "reachable" row
    # Every declared counter has its row: adding one to counters.COUNTERS is all it takes.
    assert {c.help.rstrip(".") for c in COUNTERS} <= set(rows)
    assert (rows["reachable"], rows["state"]) == ("yes", "ok")
    titles = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert titles == ["Responses", "S3", "Cache", "Events"]
    assert shim.counts == {"GET": 1, "LIST": 1}


async def test_purge_by_key_prefix_and_all(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    keys = ["a.html", "guides/b.html", "guides/c.html"]
    for key in keys:
        bucket.put(key, key.encode())
    proxy = await make_proxy(admin={"token": TOKEN})

    async def outcomes() -> list[str]:
        result = []
        for key in keys:
            resp = await proxy.get(f"/docs/{key}")
            assert await resp.read() == key.encode()
            result.append(resp.headers["X-Cache"])
        await service_of(proxy).settle()
        return result

    async def purge(*scope: str) -> str:
        code, out, err = await run_cli("purge", *scope, "--url", url(proxy))
        assert code == 0, err
        return out

    assert await outcomes() == ["MISS"] * 3
    assert re.search(r"key\s+a\.html\n  removed\s+1$", await purge("--key", "a.html"))
    assert await outcomes() == ["MISS", "HIT", "HIT"]
    assert re.search(r"removed\s+2$", await purge("--prefix", "guides/"))
    assert await outcomes() == ["HIT", "MISS", "MISS"]
    assert re.search(r"everything\s*\n  removed\s+3$", await purge("--all"))
    assert await outcomes() == ["MISS"] * 3

    code, _, err = await run_cli("purge", "--url", url(proxy))  # a scope is required: nothing happens
    assert code == 2 and "one of the arguments --key --prefix --all is required" in err
    assert await outcomes() == ["HIT"] * 3


# -- errors ---------------------------------------------------------------------------------------------------


async def test_a_refused_token_is_exit_2_and_changes_nothing(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy(admin={"token": TOKEN})
    assert await (await proxy.get("/docs/a.html")).read() == b"a"
    await service_of(proxy).settle()
    code, out, err = await run_cli("purge", "--all", "--url", url(proxy), "--token", "wrong-secret")
    assert (code, out) == (2, "")
    assert err == f"cachingproxy: the proxy refused the admin token (set {TOKEN_ENV} or pass --token)\n"
    assert (await proxy.get("/docs/a.html")).headers["X-Cache"] == "HIT"

    code, _, err = await run_cli("stats", "--url", url(proxy), token=None)
    assert code == 2 and err.startswith("cachingproxy: no admin token")


async def test_unreachable_proxy_and_missing_admin_api_are_one_line_errors(
        make_proxy: MakeProxy, shim: Shim) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = await run_cli("stats", "--url", dead)
    assert code == 2 and err.startswith(f"cachingproxy: cannot reach {dead}/_admin: ") and err.count("\n") == 1

    proxy = await make_proxy()  # no token configured: the admin API is off
    code, _, err = await run_cli("warm", "--url", url(proxy))
    assert code == 2 and err.startswith(f"cachingproxy: no admin API at {url(proxy)}/_admin")
    assert "Traceback" not in err


# -- pure parts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/_admin"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/_admin"),
    ("http://127.0.0.1:8081/ops", "http://127.0.0.1:8081/ops"),  # [admin] path = "/ops"
    ("https://mirror.lan/_admin/", "https://mirror.lan/_admin"),
    ("http://h:1/_admin?x=1#y", "http://h:1/_admin"),
])
def test_admin_base(given: str, expected: str) -> None:
    assert admin_base(given) == expected


@pytest.mark.parametrize("given", ["127.0.0.1:8080", "ftp://h/", "http://"])
def test_admin_base_rejects_non_urls(given: str) -> None:
    with pytest.raises(CliError, match="--url must look like"):
        admin_base(given)


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                         (5 * 1024**3 // 2, "2.5 GiB"), (2 * 1024**5, "2048.0 TiB")])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def job(**overrides: Any) -> dict[str, Any]:
    base = {"id": "j", "prefix": "", "listed": 100, "listed_bytes": 4096, "listing_done": True, "fetched": 20,
            "skipped": 5, "failed": 0, "failures": [], "bytes": 1024, "processed_bytes": 1024, "error": None,
            "done": False}
    return base | overrides


def test_progress_line_has_objects_bytes_rate_and_eta() -> None:
    progress = Progress(out=io.StringIO(), tty=False, started=100.0)
    assert progress.line(job(), now=110.0) == (
        "[######------------------]  25%  25/100 objects  1.0 KiB/4.0 KiB  2.5 obj/s  102 B/s  ETA 0:30")
    assert progress.line(job(listing_done=False), now=110.0).endswith("25/100+ objects  1.0 KiB/4.0 KiB  "
                                                                       "2.5 obj/s  102 B/s  ETA ?")
    finished = job(fetched=90, failed=5, processed_bytes=4096, done=True)
    assert progress.line(finished, now=110.0) == (
        "[########################] 100%  100/100 objects, 5 failed  4.0 KiB/4.0 KiB  10.0 obj/s  410 B/s  done")
    assert PROGRESS.match(progress.line(job(listed=0, listed_bytes=0, fetched=0, skipped=0, processed_bytes=0), 100))


def test_progress_redraws_on_a_terminal_and_prints_changes_only_otherwise() -> None:
    tty, pipe = io.StringIO(), io.StringIO()
    for out, is_tty in ((tty, True), (pipe, False)):
        progress = Progress(out=out, tty=is_tty, started=0.0)
        progress.update(job(), 1.0)
        progress.update(job(), 2.0)  # same counts, only the rate moved
        progress.update(job(fetched=21, processed_bytes=2048), 3.0)
        progress.finish()
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().count("\x1b[K") == 3
    assert tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and len(lines) == 2
    assert [PROGRESS.match(line)[2] for line in lines] == ["25", "26"]  # type: ignore[index]


def test_render_table_aligns_names_and_right_aligns_numbers() -> None:
    rows = [("GET", "12"), ("requests saved", "3"), ("on disk", "1.0 KiB of 1.0 GiB"), ("state", "ok")]
    assert render_table(rows, "S3") == "\n".join([
        "S3",
        "  GET              12",
        "  requests saved    3",
        "  on disk         1.0 KiB of 1.0 GiB",
        "  state           ok"])

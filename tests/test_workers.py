"""Serving on all cores (issue 6): worker processes on one port share one cache and one S3 read per cold key."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cachingproxy.models import HeldBody, ObjectMeta
from cachingproxy.store import CacheStore

from .conftest import Bucket, free_port, until
from .shim import Fault, Shim


def write_config(tmp_path: Path, port: int, endpoint: str, bucket: str, workers: int, mount: str = "/docs") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = {port}
workers = {workers}
mount = "{mount}"
[s3]
bucket = "{bucket}"
endpoint_url = "{endpoint}"
addressing_style = "path"
[cache]
directory = "{tmp_path / 'cache'}"
""")
    return config


@asynccontextmanager
async def serving(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, asyncio.Queue[bytes]]]:
    """`python -m cachingproxy serve` until the test ends; yields the process, its readiness line and a queue
    of every line it prints after that."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cachingproxy", "serve", "--config",
                                                str(config), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    stdout = proc.stdout
    later: asyncio.Queue[bytes] = asyncio.Queue()
    drain: asyncio.Task[None] | None = None
    seen: list[bytes] = []

    async def pump() -> None:  # never let the child block on a full pipe
        while line := await stdout.readline():
            later.put_nowait(line)

    try:
        async with asyncio.timeout(60):
            while b"serving http://" not in (line := await stdout.readline()):
                assert line, "the proxy exited before serving:\n" + b"".join(seen).decode(errors="replace")
                seen.append(line)
        drain = asyncio.create_task(pump())
        yield proc, line.decode(), later
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            drain.cancel()


async def raw_get(port: int, path: str, sent: asyncio.Event | None = None,
                  headed: asyncio.Event | None = None) -> tuple[str, bytes]:
    """One GET on its own connection (so the kernel may give it to any worker); (X-Cache, body).

    Sets `sent` once the request is in the kernel's hands, and `headed` once the response head arrived.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    if sent is not None:
        sent.set()
    head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
    if headed is not None:
        headed.set()
    body = await reader.read()
    writer.close()
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return headers["X-Cache"], body


async def test_two_workers_fetch_a_cold_key_from_s3_once_and_stop_cleanly(
        tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    body = os.urandom(300_000)
    bucket.put("big.bin", body)
    # The first fill stalls mid-body until every request has been sent, so that all twenty are in the
    # workers while the key is still cold.
    shim.faults["big.bin"] = Fault(stall_after=100_000)
    port = free_port()
    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=2)) as (proc, line, _):
        assert "with 2 workers" in line
        sent = [asyncio.Event() for _ in range(20)]
        headed = asyncio.Event()
        gets = [asyncio.create_task(raw_get(port, "/docs/big.bin", event, headed)) for event in sent]
        for event in sent:
            await event.wait()
        # A head means that one worker's GetObject is under way (and stalled); the others' requests are in.
        await headed.wait()
        shim.release.set()
        results = await asyncio.gather(*gets)
        assert [got == body for _, got in results] == [True] * 20
        assert shim.counts["GET"] == 1  # and the start-up bucket check's one LIST (s3state.py)
        # Now cached for every worker: hits, still one GET in all.
        again = await asyncio.gather(*(raw_get(port, "/docs/big.bin") for _ in range(8)))
        assert {(outcome, got == body) for outcome, got in again} == {("HIT", True)}
        assert shim.counts["GET"] == 1 and shim.counts["LIST"] <= 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_a_write_by_one_worker_reaches_every_workers_memory(tmp_path: Path) -> None:
    """Two stores on one directory stand for two workers: what one commits, refreshes or purges, the other's
    in-memory layer must not keep serving (a new ETag never goes out with an old body, nor a purged entry)."""
    one = CacheStore(str(tmp_path), size_limit=10_000_000)
    two = CacheStore(str(tmp_path), size_limit=10_000_000)
    await one.open()
    await two.open()

    async def put(store: CacheStore, key: str, data: bytes, now: float) -> None:
        meta = ObjectMeta(etag=f'"{hashlib.md5(data).hexdigest()}"', size=len(data), last_modified=None)
        staging = await store.stage(key, meta)
        await store.write(staging, data)
        assert await store.commit(staging, now) is not None
        staging.close()

    async def served(store: CacheStore, key: str) -> tuple[str, bytes | None, float] | None:
        entry = await store.lookup(key)
        if entry is None:
            return None
        body = await store.open_body(entry)
        data = body if isinstance(body, HeldBody) or body is None else body.read()
        if body is not None:
            await store.close_body(body)
        return entry.meta.etag, data, entry.checked_at

    try:
        await put(one, "a.html", b"version one", 1.0)
        for _ in range(2):  # the second time from memory
            assert await served(two, "a.html") == ('"' + hashlib.md5(b"version one").hexdigest() + '"',
                                                   b"version one", 1.0)
        await put(one, "a.html", b"version two!", 2.0)
        assert await served(two, "a.html") == ('"' + hashlib.md5(b"version two!").hexdigest() + '"',
                                               b"version two!", 2.0)
        entry = await one.lookup("a.html")
        assert entry is not None
        await one.mark_checked(entry.checked(entry.meta, 3.0))
        served_two = await served(two, "a.html")
        assert served_two is not None and served_two[2] == 3.0
        await one.forget("a.html")
        assert await served(two, "a.html") is None
        await put(two, "b.html", b"b", 4.0)
        assert await served(one, "b.html") is not None
        await two.purge_prefix("")
        assert await served(one, "b.html") is None
    finally:
        await one.close()
        await two.close()


async def test_stats_from_any_worker_total_every_workers_counts(
        tmp_path: Path, bucket: Bucket, shim: Shim, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket.put("a.html", b"<p>a</p>")
    monkeypatch.setenv("CACHINGPROXY_ADMIN_TOKEN", "t0ken")
    port = free_port()
    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=2)):
        # Each on its own connection: the kernel spreads them over both workers (all 16 on one: p = 2**-15).
        for _ in range(16):
            await raw_get(port, "/docs/a.html")
        answers = []
        for _ in range(6):  # likewise spread: without shared counters, some worker would report only its share
            async with aiohttp.ClientSession() as session, session.get(
                    f"http://127.0.0.1:{port}/_admin/stats", headers={"Authorization": "Bearer t0ken"}) as resp:
                assert resp.status == 200
                stats = await resp.json()
            answers.append((sum(stats["responses"].values()), stats["s3_requests"]["GET"]))
    assert answers == [(16, shim.counts["GET"])] * 6


async def test_any_worker_answers_for_a_warm_job_another_worker_runs(
        tmp_path: Path, bucket: Bucket, shim: Shim, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(30):
        bucket.put(f"guides/p{i}.html", b"<p>%d</p>" % i)
    monkeypatch.setenv("CACHINGPROXY_ADMIN_TOKEN", "t0ken")
    auth = {"Authorization": "Bearer t0ken"}
    port = free_port()
    base = f"http://127.0.0.1:{port}/_admin"

    async def admin(method: str, path: str, **kw: Any) -> tuple[int, Any]:
        # A new connection each time, as curl or a browser's parallel connections make: any worker may answer.
        async with aiohttp.ClientSession() as session, session.request(method, base + path, headers=auth,
                                                                        **kw) as resp:
            return resp.status, await resp.json()

    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=2)):
        status, started = await admin("POST", "/warm", json={"prefix": "guides/"})
        assert status == 202
        job_id = started["id"]
        async with asyncio.timeout(30):
            while True:  # polled like the CLI and the dashboard do; each poll may land on either worker
                status, job = await admin("GET", f"/warm/{job_id}")
                assert status == 200, job
                if job["done"]:
                    break
                await asyncio.sleep(0.05)
        assert (job["listed"], job["fetched"] + job["skipped"], job["failed"]) == (30, 30, 0)
        listings = [await admin("GET", "/warm") for _ in range(6)]
        assert [[j["id"] for j in jobs["jobs"]] for _, jobs in listings] == [[job_id]] * 6


async def test_the_served_process_times_requests_finer_than_its_loop_clock(
        tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    """uvloop's loop.time() moves in whole milliseconds, and it is what aiohttp hands the access logger: a
    0.3 ms hit must not be logged (and binned in the latency histogram) as 0 or 1 ms."""
    assert importlib.util.find_spec("uvloop") is not None  # the workers run on it (worker.new_event_loop)
    bucket.put("a.html", b"a" * 1000)
    port = free_port()
    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=1)) as (_, _, log):
        for _ in range(30):
            await raw_get(port, "/docs/a.html")
        hits: list[float] = []
        async with asyncio.timeout(20):
            while len(hits) < 29:  # the first request is the miss
                entry = await log.get()  # access log lines are bare JSON objects
                if entry.startswith(b"{") and json.loads(entry)["cache"] == "HIT":
                    hits.append(json.loads(entry)["ms"])
    assert any(ms != int(ms) for ms in hits), hits


async def test_a_second_instance_on_the_same_port_fails_at_start(tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    """SO_REUSEPORT lets any process of the same user join the port; a second instance must refuse to start
    (as nginx does) instead of taking every other connection, while one instance's workers still share it."""
    bucket.put("a.html", b"first")
    port = free_port()
    first = write_config(tmp_path / "first", port, shim.url, bucket.name, workers=2)
    second = write_config(tmp_path / "second", port, shim.url, bucket.name, workers=2, mount="/other")
    async with serving(first) as (proc, line, _):
        assert "with 2 workers" in line
        other = await asyncio.create_subprocess_exec(sys.executable, "-m", "cachingproxy", "serve", "--config",
                                                     str(second), stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(other.communicate(), 60)
        finally:
            if other.returncode is None:  # it started serving: kill it, then fail below
                other.kill()
                await other.wait()
        said = output.decode(errors="replace")
        assert other.returncode == 1, said
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use (cachingproxy pid {proc.pid} " in said
        assert "serving" not in said
        # Every connection still reaches the first instance (the second would answer 404 under /other).
        results = await asyncio.gather(*(raw_get(port, "/docs/a.html") for _ in range(20)))
        assert [body for _, body in results] == [b"first"] * 20
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    async with serving(second) as (_, line, _):  # the claim ended with the first instance
        assert f":{port}/other/" in line


async def next_line_with(lines: asyncio.Queue[bytes], needle: str) -> str:
    async with asyncio.timeout(30):
        while needle not in (line := (await lines.get()).decode(errors="replace")):
            pass
    return line


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_signal_the_proxy_does_not_handle_is_logged_and_stops_it(
        tmp_path: Path, bucket: Bucket, shim: Shim, workers: int) -> None:
    """SIGQUIT used to end the proxy without a log line: it now says what it got and why it stops, stops
    gracefully, and exits 128 + 3 as a death by SIGQUIT would report. (SIGHUP reloads: tests/test_reload.py.)"""
    bucket.put("a.html", b"a")
    port = free_port()
    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=workers)) as (proc, _, log):
        if workers > 1:
            # One sent to a worker alone is logged and ignored: the supervisor decides for all of them.
            children = (await asyncio.to_thread(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text)).split()
            assert len(children) == workers
            os.kill(int(children[0]), signal.SIGUSR1)
            await next_line_with(log, f"SIGUSR1 received by worker pid {children[0]}: ignored; signals are for "
                                      f"the supervisor (pid {proc.pid})")
            results = await asyncio.gather(*(raw_get(port, "/docs/a.html") for _ in range(8)))
            assert [body for _, body in results] == [b"a"] * 8
        proc.send_signal(signal.SIGQUIT)
        line = await next_line_with(log, "SIGQUIT received")
        assert "SIGQUIT received: the proxy has no quit handling beyond a graceful stop, so the proxy stops " \
               "(gracefully, as for SIGTERM)" in line
        assert await asyncio.wait_for(proc.wait(), 30) == 128 + signal.SIGQUIT


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


async def test_a_worker_that_dies_is_replaced_by_a_new_one_that_serves(
        tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    """SIGKILL to one of 2 workers: the supervisor reaps it (no zombie), logs why, and a new worker, forked by
    a new zygote that then exits, is its child and serves; the other worker was never touched."""
    bucket.put("a.html", b"alive")
    port = free_port()
    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=2)) as (proc, _, log):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        before = [int(pid) for pid in (await asyncio.to_thread(children.read_text)).split()]
        assert len(before) == 2
        victim, survivor = before
        os.kill(victim, signal.SIGKILL)
        await next_line_with(log, f"(pid {victim}) exited with -9: restarting it")

        def replaced() -> bool:  # a new child: the zygote that forked it has exited
            pids = [int(pid) for pid in children.read_text().split()]
            return len(pids) == 2 and victim not in pids

        await until(replaced, "a second worker again")
        after = [int(pid) for pid in (await asyncio.to_thread(children.read_text)).split()]
        assert survivor in after and all(_state(pid) != "Z" for pid in after)
        results = await asyncio.gather(*(raw_get(port, "/docs/a.html") for _ in range(16)))
        assert [body for _, body in results] == [b"alive"] * 16
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_a_stop_after_a_reload_gives_the_workers_the_reloaded_shutdown_timeout(
        tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    """shutdown_timeout can be reloaded, and workers drain by their own generation's setting: the supervisor's
    kill deadline must follow it, not the value the proxy started with (which killed draining workers)."""
    port = free_port()
    config = write_config(tmp_path, port, shim.url, bucket.name, workers=2)
    base = config.read_text()
    config.write_text(base.replace("[s3]", "shutdown_timeout = 1.0\n[s3]", 1))
    async with serving(config) as (proc, _, log):
        config.write_text(base.replace("[s3]", "shutdown_timeout = 40.0\n[s3]", 1))
        proc.send_signal(signal.SIGHUP)
        await next_line_with(log, "reload: done")
        proc.send_signal(signal.SIGTERM)
        line = await next_line_with(log, "stopping 2 workers")
        assert "SIGTERM received: stopping 2 workers (any still running in 45 s are killed)" in line, line
        assert await asyncio.wait_for(proc.wait(), 30) == 0

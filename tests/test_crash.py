"""Crash safety (docs/reliability.md §6 rows 15 and 37): the proxy as a real subprocess, killed or stopped mid-write."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import aiohttp

from .conftest import Bucket, free_port

OBJECTS = 40
SIZE = 2 * 1024 * 1024


def write_config(tmp_path: Path, port: int, moto_url: str, bucket: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = {port}
shutdown_timeout = 20.0
[s3]
bucket = "{bucket}"
endpoint_url = "{moto_url}"
addressing_style = "path"
[cache]
directory = "{tmp_path / 'cache'}"
""")
    return config


@asynccontextmanager
async def proxy_process(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cachingproxy", "serve", "--config",
                                                str(config), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"serving http://" not in await proc.stdout.readline():
                pass
        # Keep draining the log so the child never blocks on a full pipe.
        drain = asyncio.create_task(proc.stdout.read())
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        drain.cancel()


async def read_all(session: aiohttp.ClientSession, url: str) -> tuple[str, bytes]:
    async with session.get(url) as resp:
        return resp.headers["X-Cache"], await resp.read()


async def test_row15_sigkill_during_concurrent_fills_never_leaves_a_servable_wrong_byte(
        tmp_path: Path, moto_url: str, bucket: Bucket) -> None:
    bodies = {f"obj{i}.bin": os.urandom(SIZE) for i in range(OBJECTS)}
    for key, body in bodies.items():
        bucket.put(key, body)
    port = free_port()
    config = write_config(tmp_path, port, moto_url, bucket.name)
    base = f"http://127.0.0.1:{port}/docs/"
    served = 0
    # Kill at several points: as the first response starts, and after 10 and 25 bodies completed.
    for kill_after in (0, 10, 25):
        async with proxy_process(config) as proc, aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(read_all(session, base + key)) for key in bodies]
            for done, finished in enumerate(asyncio.as_completed(tasks)):
                with suppress(aiohttp.ClientError):
                    await finished
                if done >= kill_after:
                    break
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Restart on the same directory: every object must come back byte-exact, cached or refetched.
        async with proxy_process(config), aiohttp.ClientSession() as session:
            staging = list((tmp_path / "cache" / "staging").iterdir())
            assert staging == [], "half-written files survived the restart"
            for key, body in bodies.items():
                outcome, got = await read_all(session, base + key)
                assert hashlib.md5(got).digest() == hashlib.md5(body).digest(), (key, outcome)
                served += outcome == "HIT"
    assert served > 0  # some entries were committed before a kill, and those were served from disk


async def test_row37_sigterm_lets_in_flight_downloads_finish_and_exits_zero(
        tmp_path: Path, moto_url: str, bucket: Bucket) -> None:
    body = os.urandom(50 * 1024 * 1024)
    bucket.put("big.bin", body)
    port = free_port()
    config = write_config(tmp_path, port, moto_url, bucket.name)
    url = f"http://127.0.0.1:{port}/docs/big.bin"
    async with proxy_process(config) as proc, aiohttp.ClientSession() as session:
        responses = [await session.get(url) for _ in range(10)]  # headers in, bodies not yet read
        proc.send_signal(signal.SIGTERM)
        bodies = await asyncio.gather(*(resp.read() for resp in responses), return_exceptions=True)
        assert await proc.wait() == 0
    assert [got == body or repr(got) for got in bodies] == [True] * 10
    # What the stopped proxy left behind is complete: the restart serves it from disk, byte-exact.
    async with proxy_process(config), aiohttp.ClientSession() as session:
        outcome, got = await read_all(session, url)
    assert (outcome, got == body) == ("HIT", True)

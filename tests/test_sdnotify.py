"""systemd's notify protocol (issue 14), received on a real Unix datagram socket from `cachingproxy serve`;
and the unit file checked by systemd's own tools where they are installed."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from cachingproxy.sdnotify import notify, watchdog_interval

from .conftest import Bucket, free_port
from .shim import Shim

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "cachingproxy.service"


class Listener:
    """The service manager's end: a bound datagram socket, read without blocking the loop."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next(self) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30):
            data = await loop.sock_recv(self.sock, 4096)
        return data.decode()

    async def until(self, prefix: str) -> list[str]:
        """Every message up to and including the first that starts with `prefix`."""
        seen = []
        while not (message := await self.next()).startswith(prefix):
            seen.append(message)
        return [*seen, message]


def test_notify_without_a_socket_does_nothing_and_watchdog_follows_the_environment() -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}) is False  # logged, never raised
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None  # another's
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_watchdog_and_stopping_reach_the_socket(tmp_path: Path, bucket: Bucket, shim: Shim,
                                                            workers: int) -> None:
    listener = Listener(tmp_path / "notify.sock")
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = {port}
workers = {workers}
[s3]
bucket = "{bucket.name}"
endpoint_url = "{shim.url}"
addressing_style = "path"
[cache]
directory = "{tmp_path / 'cache'}"
""")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cachingproxy", "serve", "--config",
                                                str(config), env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        before = await listener.until("READY=1")
        assert all(m == "WATCHDOG=1" for m in before[:-1])
        assert re.fullmatch(r"READY=1\nSTATUS=serving http://127\.0\.0\.1:\d+/docs/ with \d workers? \(pid \d+\)",
                            before[-1]), before[-1]
        # READY means every worker accepts: a request right now is answered.
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        # WATCHDOG_USEC = 0.2 s: a ping every 0.1 s.
        assert [await listener.next() for _ in range(3)] == ["WATCHDOG=1"] * 3
        proc.send_signal(signal.SIGTERM)
        assert (await listener.until("STOPPING=1"))[-1] == "STOPPING=1"
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        listener.sock.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_unit_file_verifies_and_scores_2_or_lower(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this environment's.
    unit = tmp_path / "cachingproxy.service"
    program = Path(sys.executable).parent / "cachingproxy"
    unit.write_text(UNIT.read_text().replace("/opt/cachingproxy/bin/cachingproxy", str(program)))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "cachingproxy.service" not in verify.stderr, verify.stderr  # no warning about our unit
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                              text=True, timeout=60)
    assert security.returncode == 0, security.stderr
    score = re.search(r"Overall exposure level for cachingproxy.service: (\d+\.\d)", security.stdout)
    assert score is not None, security.stdout
    print(f"\nsystemd-analyze security: {score.group(1)}")
    assert float(score.group(1)) <= 2.0, security.stdout

"""The real process: `python -m cachingproxy serve` and `python -m cachingproxy.demo`, over sockets."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import IO

from .conftest import Bucket, free_port


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> str:
    """Block until the process prints a line containing `needle` (the server's own readiness signal)."""
    assert proc.stdout is not None
    stream: IO[str] = proc.stdout
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while sel.select(timeout):
            line = stream.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"{needle!r} not printed; output was:\n{''.join(seen)}")


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_serve_command_serves_and_stops_cleanly_on_sigterm(tmp_path: Path, moto_url: str, bucket: Bucket) -> None:
    bucket.put("index.html", b"<h1>home</h1>", ContentType="text/html")
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = {port}
[s3]
bucket = "{bucket.name}"
endpoint_url = "{moto_url}"
addressing_style = "path"
[cache]
directory = "{tmp_path / 'cache'}"
""")
    proc = subprocess.Popen([sys.executable, "-m", "cachingproxy", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        wait_for_line(proc, "serving http://")
        status, headers, body = get(f"http://127.0.0.1:{port}/docs/")
        assert (status, body, headers["X-Cache"]) == (200, b"<h1>home</h1>", "MISS")
        assert get(f"http://127.0.0.1:{port}/docs/")[1]["X-Cache"] == "HIT"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_demo_serves_the_sample_site(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cachingproxy.demo", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(proc, "serving http://")
        status, headers, body = get(f"http://127.0.0.1:{port}/docs/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert b"_static/site.css" in body
        css_status, css_headers, _ = get(f"http://127.0.0.1:{port}/docs/_static/site.css")
        assert css_status == 200 and css_headers["Content-Type"].startswith("text/css")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()

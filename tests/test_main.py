"""The real process: `python -m cachingproxy serve` and `python -m cachingproxy.demo`, over sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import pytest

from cachingproxy.demo import set_toml_value

from .conftest import Bucket, free_port

# Starting a proxy is a second or two on an idle machine; a loaded 2-core CI box (four suites at once) has been
# seen to take twenty times that, and a start that never comes still fails, only later.
STARTUP = 120.0


class Output:
    """Every line a child process prints, read on a thread until it exits.

    The earlier helper select()ed on the pipe, then called readline(): when two lines arrived in one read
    (the demo's banner; log lines batched under load), the second sat in the reader's buffer while select()
    waited for bytes the child would never send, and "serving" went unseen until the timeout. Reading on a
    thread also keeps the pipe drained, so the child never blocks on a full pipe.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stream: IO[str] = proc.stdout
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float = STARTUP) -> str:
        """The first line containing `needle`, once printed; AssertionError if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    raise AssertionError(f"{needle!r} not printed; output was:\n{''.join(self._lines)}")
                self._changed.wait(left)

    def text(self) -> str:
        with self._changed:
            return "".join(self._lines)


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
        Output(proc).wait_for("serving http://")
        status, headers, body = get(f"http://127.0.0.1:{port}/docs/")
        assert (status, body, headers["X-Cache"]) == (200, b"<h1>home</h1>", "MISS")
        assert get(f"http://127.0.0.1:{port}/docs/")[1]["X-Cache"] == "HIT"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def start_demo(cwd: Path, *args: str) -> tuple[subprocess.Popen[str], Output]:
    # -u: unbuffered, so every line reaches the pipe as it is printed, whatever the demo forgets to flush.
    proc = subprocess.Popen([sys.executable, "-u", "-m", "cachingproxy.demo", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, Output(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0


def test_demo_serves_the_sample_site_and_prints_what_to_try(tmp_path: Path) -> None:
    port = free_port()
    proc, output = start_demo(tmp_path, "--port", str(port))
    try:
        output.wait_for("serving http://")
        status, headers, body = get(f"http://127.0.0.1:{port}/docs/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert b"_static/site.css" in body
        css_status, css_headers, _ = get(f"http://127.0.0.1:{port}/docs/_static/site.css")
        assert css_status == 200 and css_headers["Content-Type"].startswith("text/css")
        # The second site: the same pages from another bucket, with a listing for the folder without an index.
        assert output.wait_for("Handbook:").split()[1] == f"http://127.0.0.1:{port}/handbook/"
        status, _, body = get(f"http://127.0.0.1:{port}/handbook/")
        assert status == 200 and b"_static/site.css" in body
        status, headers, body = get(f"http://127.0.0.1:{port}/handbook/downloads/")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"handbook.zip" in body

        token = output.wait_for("Token:").split()[1]
        assert len(token) >= 20
        admin = f"http://127.0.0.1:{port}/_admin"
        for label, url in (("Docs:", f"http://127.0.0.1:{port}/docs/"), ("Dashboard:", admin + "/"),
                           ("Stats:", admin + "/stats"), ("Metrics:", admin + "/metrics")):
            assert output.wait_for(label).split()[1] == url
        # The lines to paste work as printed (run by a shell, from where the demo runs).
        curls = [line.strip() for line in output.text().splitlines() if line.strip().startswith("curl ")]
        assert curls == [f'curl -H "Authorization: Bearer {token}" {admin}/stats',
                         f'curl -H "Authorization: Bearer {token}" {admin}/metrics']
        stats, metrics = (subprocess.run(curl + " --fail --silent", shell=True, capture_output=True, text=True,
                                         timeout=60, check=True).stdout for curl in curls)
        assert json.loads(stats)["sites"]["docs"]["responses"]["MISS"] == 2
        assert 'cachingproxy_cache_misses_total{site="docs"} 2.0' in metrics.splitlines()
        warm = output.wait_for(" warm --url ").strip()
        assert warm.startswith(f"CACHINGPROXY_ADMIN_TOKEN={token} ") and warm.endswith(" --site docs")
        warmed = subprocess.run(warm, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert warmed.returncode == 0, warmed.stdout + warmed.stderr
        assert re.search(r"^ +listed +18 .*^ +failed +0$", warmed.stdout, flags=re.MULTILINE | re.DOTALL), warmed.stdout
        output.wait_for("admin token from CACHINGPROXY_ADMIN_TOKEN")
        stop(proc)
    finally:
        proc.kill()
        proc.wait()


def test_demo_keeps_the_operators_config_edits_across_restarts(tmp_path: Path) -> None:
    port = free_port()
    proc, output = start_demo(tmp_path, "--port", str(port))
    try:
        output.wait_for("serving http://")
        token = output.wait_for("Token:").split()[1]
        stop(proc)
    finally:
        proc.kill()
        proc.wait()
    config = tmp_path / "demo-cache" / "config.toml"
    assert "yours to edit" in output.text()
    edited = config.read_text().replace('mount = "/docs"', 'mount = "/manual"  # my edit')
    config.write_text(edited)

    proc, output = start_demo(tmp_path)  # no --port: the file's port stays
    try:
        output.wait_for(f"serving http://127.0.0.1:{port}/")
        assert output.wait_for("Docs:").split()[1] == f"http://127.0.0.1:{port}/manual/"
        assert output.wait_for("Token:").split()[1] != token  # a fresh one every run
        status, _, body = get(f"http://127.0.0.1:{port}/manual/")  # so the new S3 endpoint went in too
        assert status == 200 and b"_static/site.css" in body
        kept = config.read_text()
        assert 'mount = "/manual"  # my edit' in kept
        assert kept.replace(_endpoint(kept), "") == edited.replace(_endpoint(edited), "")
        stop(proc)
    finally:
        proc.kill()
        proc.wait()


def _endpoint(config_text: str) -> str:
    return next(line for line in config_text.splitlines() if line.startswith("endpoint_url = "))


@pytest.mark.parametrize(("text", "section", "key", "literal", "expected"), [
    ('[s3]\nendpoint_url = "a"  # c\nx = 1\n', "s3", "endpoint_url", '"b"', '[s3]\nendpoint_url = "b"\nx = 1\n'),
    ("[server]\nport = 1\n[admin]\nport = 2\n", "admin", "port", "3", "[server]\nport = 1\n[admin]\nport = 3\n"),
    ("[server]\nport = 1\n[admin]\nport = 2\n", "server", "port", "3", "[server]\nport = 3\n[admin]\nport = 2\n"),
    ("[server]\nhost = 'h'\n", "server", "port", "3", "[server]\nport = 3\nhost = 'h'\n"),
    ("[cache]\nttl = 1", "s3", "endpoint_url", '"b"', '[cache]\nttl = 1\n\n[s3]\nendpoint_url = "b"\n'),
    ('[s3]\nx = 1\n[[sites]]\nendpoint_url = "a"\n[sites.s3]\nendpoint_url = "a"\n', "s3", "endpoint_url", '"b"',
     '[s3]\nendpoint_url = "b"\nx = 1\n[[sites]]\nendpoint_url = "a"\n[sites.s3]\nendpoint_url = "a"\n'),
], ids=["replace-dropping-comment", "right-section-only", "first-section", "missing-key", "missing-section",
     "not-in-arrays-of-tables"])
def test_set_toml_value(text: str, section: str, key: str, literal: str, expected: str) -> None:
    assert set_toml_value(text, section, key, literal) == expected

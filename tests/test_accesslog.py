"""The access log: bare JSON lines (or combined, or none), whole lines even from several workers at once,
a request id in the line and in X-Request-Id; and `Server: cachingproxy` on every response."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from cachingproxy.accessline import LINE_LIMIT, combined_line, json_line, new_request_id, request_id_from
from cachingproxy.app import create_app, server_kwargs
from cachingproxy.config import ConfigError, parse_config

from .conftest import Bucket, FakeClock, MakeProxy, config_for, free_port
from .shim import Shim

WHEN = 1_764_750_012.3456  # 2025-12-03T08:20:12.345Z


def test_a_json_line_has_every_field_in_order() -> None:
    line = json_line(when=WHEN, site="handbook", client="10.0.0.7", method="GET", path="/docs/a%20b.html",
                     status=200, size=1234, cache="HIT", ms=0.42, s3={"GET": 1}, user_agent='curl/8 "quoted"',
                     request_id="ab-1")
    assert line == ('{"time":"2025-12-03T08:20:12.345Z","site":"handbook","client":"10.0.0.7","method":"GET",'
                    '"path":"/docs/a%20b.html","status":200,"bytes":1234,"cache":"HIT","ms":0.4,"s3":{"GET":1},'
                    '"ua":"curl/8 \\"quoted\\"",'
                    '"id":"ab-1"}')
    assert json.loads(line)["ua"] == 'curl/8 "quoted"'


def test_a_line_never_reaches_pipe_buf_and_says_when_it_was_cut() -> None:
    long = json_line(when=WHEN, site="-", client="::1", method="GET", path="/docs/" + "\x01é" * 4000, status=404,
                     size=0, cache="-", ms=1.0, s3={}, user_agent="\n" * 5000, request_id=new_request_id())
    assert len(long.encode()) <= LINE_LIMIT and "\n" not in long
    parsed = json.loads(long)
    assert parsed["cut"] is True and parsed["path"].startswith("/docs/\x01é") and parsed["status"] == 404
    short = json.loads(json_line(when=WHEN, site="-", client="::1", method="GET", path="/docs/a", status=200, size=1,
                                 cache="HIT", ms=1.0, s3={}, user_agent="x", request_id="i"))
    assert "cut" not in short


def test_a_combined_line_reads_as_apache_and_nginx_write_it() -> None:
    line = combined_line(when=WHEN, client="10.0.0.7", method="GET", path="/docs/a.html", version="HTTP/1.1",
                         status=200, size=1234, referer="http://intranet/docs/?token=s3cret", user_agent='Mo"z\n')
    assert line == ('10.0.0.7 - - [03/Dec/2025:08:20:12 +0000] "GET /docs/a.html HTTP/1.1" 200 1234 '
                    '"http://intranet/docs/" "Mo\\x22z\\x0A"')
    empty = combined_line(when=WHEN, client="", method="HEAD", path="/", version="HTTP/1.0", status=304, size=0,
                          referer="", user_agent="")
    assert empty == '- - - [03/Dec/2025:08:20:12 +0000] "HEAD / HTTP/1.0" 304 - "-" "-"'
    huge = combined_line(when=WHEN, client="::1", method="GET", path="/" + "é" * 5000, version="HTTP/1.1",
                         status=400, size=0, referer="é" * 5000, user_agent="é" * 5000)
    assert len(huge.encode()) <= LINE_LIMIT


def test_request_ids_are_unique_and_a_front_proxys_plain_id_is_kept() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert request_id_from("nginx-5f2a9c") == "nginx-5f2a9c"
    for hostile in ("a b", "x" * 65, "a\r\nSet-Cookie: x", "", None):
        assert request_id_from(hostile) != hostile


def test_access_log_setting_is_checked() -> None:
    assert parse_config({"s3": {"bucket": "b"}, "server": {"access_log": "combined"}}).server.access_log == "combined"
    with pytest.raises(ConfigError, match=r"server.access_log: must be one of \('json', 'combined', 'off'\)"):
        parse_config({"s3": {"bucket": "b"}, "server": {"access_log": "apache"}})


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.logged.set()


@pytest.mark.parametrize("kind", ["combined", "off"])
async def test_combined_and_off(kind: str, aiohttp_client: Any, tmp_path: Path, shim: Shim, bucket: Bucket,
                                clock: FakeClock) -> None:
    bucket.put("a.html", b"a" * 10)
    lines = Lines()
    logger = logging.getLogger(f"test.access.{kind}")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    config = config_for(tmp_path, shim.url, bucket.name, server={"access_log": kind})
    server = TestServer(create_app(config, clock=clock))
    await server.start_server(**server_kwargs(config), access_log=logger)
    proxy = await aiohttp_client(server)
    resp = await proxy.get("/docs/a.html?secret=1", headers={"User-Agent": "probe/1", "Referer": "http://x/?t=2"})
    assert resp.status == 200 and resp.headers["Server"] == "cachingproxy"
    if kind == "combined":
        await asyncio.wait_for(lines.logged.wait(), 10)  # the access logger runs once the response is sent
    await proxy.close()  # for "off": the response, and so its access log call, is over
    logger.removeHandler(lines)
    if kind == "off":
        assert lines.lines == []
        return
    [line] = lines.lines
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /docs/a\.html HTTP/1\.1" '
                        r'200 10 "http://x/" "probe/1"', line), line


async def test_lines_from_several_workers_never_interleave(tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    """Two workers write their access lines to one pipe at once. Lines of about 3.7 KB (a long key and user
    agent) make it likely that a buffered writer splits one across two writes, with the other worker's bytes
    in between."""
    key = "k" * 1000 + ".html"  # with a 2500-byte User-Agent, lines of about 3.7 KB
    bucket.put(key, b"x")
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = {port}
workers = 2
[s3]
bucket = "{bucket.name}"
endpoint_url = "{shim.url}"
addressing_style = "path"
[cache]
directory = "{tmp_path / 'cache'}"
""")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cachingproxy", "serve", "--config",
                                                str(config), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    output: list[bytes] = []
    try:
        async with asyncio.timeout(120):
            while b"serving http://" not in (line := await proxy_line(proc.stdout)):
                output.append(line)

        async def get(_: int) -> tuple[str, str]:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET /docs/{key} HTTP/1.1\r\nHost: x\r\nUser-Agent: {'u' * 2500}\r\nConnection: close\r\n\r\n"
                    .encode())
            head = (await r.read()).partition(b"\r\n\r\n")[0].decode()
            w.close()
            status = head.split()[1]
            request_id = re.search(r"X-Request-Id: (\S+)", head)
            assert request_id is not None and "Server: cachingproxy" in head, head
            return status, request_id[1]

        answers = []
        for _ in range(4):  # in waves, so both workers have many lines in their batches at once
            answers += await asyncio.gather(*(get(i) for i in range(60)))
        # Only now is the pipe read: it filled (64 KiB) long ago, so both workers' writers are blocked part-way
        # through a write, which is where writes longer than PIPE_BUF interleave (pipe(7)).
        reader = asyncio.create_task(proc.stdout.read())  # everything else, until it exits
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        output.append(await reader)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert {status for status, _ in answers} == {"200"}
    text = b"".join(output).decode()
    logged = []
    for line in text.splitlines():
        if line.startswith("{"):
            logged.append(json.loads(line))  # a torn or interleaved line would not parse
        else:  # every other line is a whole log record or the banner
            assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |cachingproxy: serving ", line), line
    assert sorted(entry["id"] for entry in logged) == sorted(request_id for _, request_id in answers)
    assert {entry["path"] for entry in logged} == {f"/docs/{key}"}


async def proxy_line(stream: asyncio.StreamReader) -> bytes:
    line = await stream.readline()
    assert line, "the proxy exited before serving"
    return line


async def test_every_response_says_server_cachingproxy_and_nothing_more(make_proxy: MakeProxy, bucket: Bucket,
                                                                        shim: Shim) -> None:
    bucket.put("a.html", b"a")
    proxy = await make_proxy()
    for path in ("/docs/a.html", "/docs/missing.html", "/healthz", "/elsewhere"):
        assert (await proxy.get(path)).headers["Server"] == "cachingproxy", path
    # aiohttp's own answer to a request it cannot parse never reaches the app's hooks.
    assert proxy.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /docs/a.html HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")) and b"\r\nServer: cachingproxy\r\n" in answer, answer

"""Reload on SIGHUP (issue 14), on the real `cachingproxy serve` with two workers over TLS: a TTL changes, a site
is added, the certificate rotates and an access list changes while a 100 MB download in flight completes
intact; an invalid file changes nothing; systemd hears RELOADING=1 and READY=1 around it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

from cachingproxy.config import load_config
from cachingproxy.reload import Reloaded, load_for_reload

from .conftest import Bucket, free_port
from .shim import Shim

BIG = 100 * 1024 * 1024
TOKEN = "reload-t0ken"


def write_pair(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path, bytes]:
    cert = ca.issue_cert("127.0.0.1")
    chain, key = directory / f"{name}.pem", directory / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key, ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def config_text(tmp_path: Path, port: int, shim: Shim, bucket: Bucket, cert: Path, key: Path, *, open_ttl: int,
                docs_allow: str, extra: bool) -> str:
    text = f"""
[server]
port = {port}
workers = 2
shutdown_timeout = 60.0
tls_certificate = "{cert}"
tls_key = "{key}"
[s3]
endpoint_url = "{shim.url}"
addressing_style = "path"
[cache]
directory = "{tmp_path / 'cache'}"
ttl = 60
[admin]
token = "{TOKEN}"

[[sites]]
name = "docs"
mount = "/docs"
[sites.s3]
bucket = "{bucket.name}"
[sites.access]
allow = [{docs_allow}]

[[sites]]
name = "open"
mount = "/open"
[sites.s3]
bucket = "{bucket.name}"
[sites.cache]
ttl = {open_ttl}
"""
    if extra:
        text += f"""
[[sites]]
name = "extra"
mount = "/extra"
[sites.s3]
bucket = "{bucket.name}"
"""
    return text


class Notifications:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def until(self, prefix: str) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(90):
            while not (message := (await loop.sock_recv(self.sock, 4096)).decode()).startswith(prefix):
                pass
        return message


async def request(port: int, context: ssl.SSLContext, path: str,
                  extra: str = "") -> tuple[int, dict[str, str], bytes, bytes]:
    """One GET on a new TLS connection: status, headers, body and the certificate the server presented."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n".encode())
    head, body = (await reader.read()).split(b"\r\n\r\n", 1)
    writer.close()
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, der


async def loaded(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    """The configuration hash /stats and /metrics report."""
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    stats = json.loads((await request(port, context, "/_admin/stats", auth))[2])
    metrics = (await request(port, context, "/_admin/metrics", auth))[2].decode()
    found = re.search(r'^cachingproxy_config_loaded_timestamp_seconds\{hash="(\w+)"\} (\S+)$', metrics, re.M)
    assert found is not None and abs(float(found.group(2)) - stats["config"]["loaded_at"]) < 0.01
    return stats["config"]["hash"], found.group(1)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def ttl_of(headers: dict[str, str]) -> int:
    found = re.search(r"ttl=(\d+)", headers.get("cache-status", ""))
    assert found is not None, (headers.get("cache-status"), headers.get("x-cache"))
    return int(found.group(1))


async def test_reload_swaps_everything_while_a_download_completes(tmp_path: Path, bucket: Bucket,
                                                                 shim: Shim) -> None:
    ca = trustme.CA()
    cert1, key1, der1 = write_pair(ca, tmp_path, "one")
    cert2, key2, der2 = write_pair(ca, tmp_path, "two")
    client = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    big = os.urandom(BIG)
    bucket.put("big.bin", big)
    bucket.put("a.html", b"<p>a</p>", ContentType="text/html")
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path, port, shim, bucket, cert1, key1, open_ttl=600,
                                  docs_allow='"127.0.0.0/8"', extra=False))
    notes = Notifications(tmp_path / "notify.sock")
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cachingproxy", "serve", "--config", str(config), stdout=out, stderr=out,
            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        await notes.until("READY=1")
        status, headers, body, der = await request(port, client, "/docs/big.bin")  # fills the cache
        assert (status, hashlib.sha256(body).digest(), der) == (200, hashlib.sha256(big).digest(), der1)
        await request(port, client, "/open/a.html")
        status, headers, _, _ = await request(port, client, "/open/a.html")
        assert status == 200 and 300 < ttl_of(headers) <= 600
        assert (await request(port, client, "/extra/a.html"))[0] == 404
        first_hash = digest(config)
        assert await loaded(port, client) == (first_hash, first_hash)

        # A download in flight: the head and the first megabyte read, the rest waiting in the kernel.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        writer.write(b"GET /docs/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {BIG}".encode() in head
        first = await reader.readexactly(1024 * 1024)

        config.write_text(config_text(tmp_path, port, shim, bucket, cert2, key2, open_ttl=5,
                                      docs_allow='"10.0.0.0/8"', extra=True))
        proc.send_signal(signal.SIGHUP)
        reloading = await notes.until("RELOADING=1")
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading)
        await notes.until("READY=1")

        status, headers, body, der = await request(port, client, "/open/a.html")
        assert status == 200 and der == der2, "the new certificate is served"
        status, headers, body, der = await request(port, client, "/open/a.html")  # a hit or a revalidation
        assert ttl_of(headers) <= 5, "the new TTL applies to an entry cached before"
        assert (await request(port, client, "/extra/a.html"))[:3:2] == (200, b"<p>a</p>"), "the added site"
        assert (await request(port, client, "/docs/a.html"))[0] == 403, "the new access list"
        assert await loaded(port, client) == (digest(config), digest(config)) != (first_hash, first_hash)

        rest = await reader.read()  # the old worker finishes what it started, under the old configuration
        writer.close()
        assert len(first) + len(rest) == BIG
        assert hashlib.sha256(first + rest).digest() == hashlib.sha256(big).digest()

        # An invalid file: every problem logged, nothing changes.
        config.write_text(config_text(tmp_path, port, shim, bucket, cert1, key2, open_ttl=5,
                                      docs_allow='"10.0.0.1/8"', extra=False))
        proc.send_signal(signal.SIGHUP)
        await notes.until("RELOADING=1")
        await notes.until("READY=1")
        said = log.read_text()
        assert "is not an address or CIDR network" in said
        assert "reload refused: 1 problem; still serving the previous configuration" in said
        assert (await request(port, client, "/extra/a.html"))[0] == 200
        status, _, _, der = await request(port, client, "/docs/a.html")
        assert (status, der) == (403, der2)

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notes.sock.close()


def test_settings_that_need_a_restart_are_kept_and_named(tmp_path: Path) -> None:
    def write(port: int, workers: int, directory: str, ttl: int) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(f'[server]\nport = {port}\nworkers = {workers}\n[s3]\nbucket = "b"\n'
                        f'[cache]\ndirectory = "{directory}"\nttl = {ttl}\n')
        return path

    running = load_config(write(8080, 2, "/var/cache/a", 60))
    result = load_for_reload(str(write(9090, 4, "/var/cache/b", 5)), running)
    assert isinstance(result, Reloaded)
    assert (result.config.server.port, result.config.server.workers, result.config.cache.directory) == \
        (8080, 2, "/var/cache/a")
    assert result.config.sites[0].cache.ttl == 5
    assert result.kept == ("server.port: 8080 (the file says 9090)", "server.workers: 2 (the file says 4)",
                           "cache.directory: '/var/cache/a' (the file says '/var/cache/b')")
    assert len(result.digest) == 12


@pytest.mark.parametrize(("content", "problem"), [
    ('[server]\nport = "x"\n', "server.port: must be int"),
    ('[[sites]]\nname = "a"\n[sites.s3]\nbucket = "b"\n[sites.access]\nhtpasswd = "/nonexistent"\n',
     "/nonexistent: file not found"),
])
def test_an_invalid_file_gives_every_problem_and_no_config(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(content)
    result = load_for_reload(str(path), load_config_minimal(tmp_path))
    assert isinstance(result, list) and any(problem in line for line in result), result


def load_config_minimal(tmp_path: Path) -> Any:
    path = tmp_path / "running.toml"
    path.write_text('[s3]\nbucket = "b"\n')
    return load_config(path)

"""TLS (issue 14): `cachingproxy serve` with a certificate made here by trustme, verified by a client that trusts
only that CA; TLS 1.1 refused; the plain port redirects; the admin listener with its own certificate; bad files
refuse to start, naming the file."""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import trustme

from cachingproxy.__main__ import main
from cachingproxy.redirect import https_location

from .conftest import Bucket, free_port
from .shim import Shim

TOKEN = "tls-t0ken"


def write_pair(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(*hosts)
    chain, key = directory / f"{name}.pem", directory / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """Trusts this CA and nothing else: no system store."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    return context


@asynccontextmanager
async def serving(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cachingproxy", "serve", "--config",
                                                str(config), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    stdout = proc.stdout
    seen: list[bytes] = []
    drain: asyncio.Task[None] | None = None

    async def pump() -> None:
        while await stdout.readline():
            pass

    try:
        async with asyncio.timeout(60):
            while b"cachingproxy: serving https://" not in (line := await stdout.readline()):
                assert line, "the proxy exited before serving:\n" + b"".join(seen).decode(errors="replace")
                seen.append(line)
        drain = asyncio.create_task(pump())
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            drain.cancel()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_config(tmp_path: Path, bucket: Bucket, shim: Shim, extra: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[s3]
bucket = "{bucket.name}"
endpoint_url = "{shim.url}"
addressing_style = "path"
[cache]
directory = "{tmp_path / 'cache'}"
{extra}
""")
    return config


async def test_https_redirect_and_admin_over_tls(tmp_path: Path, bucket: Bucket, shim: Shim, ca: trustme.CA) -> None:
    bucket.put("a.html", b"<p>over tls</p>", ContentType="text/html")
    # Issued by an intermediate: a client that trusts only the root verifies it only if the chain is served whole.
    cert, key = write_pair(ca.create_child_ca(), tmp_path, "proxy", "docs.corp", "127.0.0.1")
    admin_cert, admin_key = write_pair(ca, tmp_path, "admin", "127.0.0.1")
    port, plain, admin = free_port(), free_port(), free_port()
    config = write_config(tmp_path, bucket, shim, f"""
[server]
port = {port}
workers = 2
tls_certificate = "{cert}"
tls_key = "{key}"
redirect_http_port = {plain}
[admin]
token = "{TOKEN}"
port = {admin}
tls_certificate = "{admin_cert}"
tls_key = "{admin_key}"
""")
    trusting = client_context(ca)
    async with serving(config), aiohttp.ClientSession() as http:
        async with http.get(f"https://127.0.0.1:{port}/docs/a.html", ssl=trusting) as resp:
            assert resp.status == 200 and await resp.read() == b"<p>over tls</p>"
        # Verified for real: a client that trusts the system store (not our CA) refuses the certificate.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(f"https://127.0.0.1:{port}/docs/a.html", ssl=ssl.create_default_context())
        # HTTPS only: a plain request on the TLS port gets no HTTP answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /docs/a.html HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        # The plain port: 308 to the same path and query, on the Host the client used.
        async with http.get(f"http://127.0.0.1:{plain}/docs/a.html?v=1", headers={"Host": f"docs.corp:{plain}"},
                            allow_redirects=False) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == f"https://docs.corp:{port}/docs/a.html?v=1"
        async with http.post(f"http://127.0.0.1:{plain}/x", allow_redirects=False) as resp:
            assert resp.status == 308  # every method: nothing is served in the clear
        async with http.get(f"https://127.0.0.1:{admin}/_admin/stats", ssl=trusting,
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # deprecated on purpose here
async def test_tls_1_1_is_refused_by_the_server(tmp_path: Path, bucket: Bucket, shim: Shim, ca: trustme.CA) -> None:
    cert, key = write_pair(ca, tmp_path, "proxy", "127.0.0.1")
    port = free_port()
    config = write_config(tmp_path, bucket, shim, f"""
[server]
port = {port}
workers = 1
tls_certificate = "{cert}"
tls_key = "{key}"
""")

    def client(highest: ssl.TLSVersion) -> ssl.SSLContext:
        context = client_context(ca)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = highest
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 would not even offer TLS 1.1 otherwise
        return context

    async with serving(config):
        # The same client, allowed up to 1.2, connects: so the refusal below is the server's.
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client(ssl.TLSVersion.TLSv1_2))
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
        writer.close()
        # The server answers a 1.1 hello with a protocol_version alert, or drops the connection.
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
            await asyncio.open_connection("127.0.0.1", port, ssl=client(ssl.TLSVersion.TLSv1_1))
        if isinstance(refused.value, ssl.SSLError):
            assert "PROTOCOL_VERSION" in str(refused.value).upper().replace(" ", "_"), refused.value


@pytest.mark.parametrize(("host", "path", "port", "location"), [
    ("docs.corp", "/a?b=1", 443, "https://docs.corp/a?b=1"),
    ("docs.corp:80", "/a", 8443, "https://docs.corp:8443/a"),
    ("[::1]:80", "/", 443, "https://[::1]/"),
    ("evil.com/x", "/a", 443, None),  # a Host that would change the URL
    ("docs.corp", "//evil.com/", 443, None),
    ("", "/a", 443, None),
])
def test_https_location(host: str, path: str, port: int, location: str | None) -> None:
    assert https_location(host, path, port) == location


@pytest.mark.parametrize("problem", ["missing", "mismatched", "not pem"])
def test_bad_certificate_files_refuse_to_start_naming_the_file(tmp_path: Path, ca: trustme.CA, problem: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = write_pair(ca, tmp_path, "proxy", "127.0.0.1")
    _, other_key = write_pair(ca, tmp_path, "other", "127.0.0.1")
    named = {"missing": tmp_path / "gone.pem", "mismatched": other_key, "not pem": cert}[problem]
    if problem == "missing":
        cert = named
    elif problem == "mismatched":
        key = other_key
    else:
        cert.write_text("not a certificate\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\ntls_certificate = "{cert}"\ntls_key = "{key}"\n[s3]\nbucket = "b"\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"cachingproxy: {named}: " in err, err

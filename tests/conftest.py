"""Shared fixtures: one moto server per session, a counting shim and a fresh bucket per test, a fake clock."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import boto3
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient, TestServer
from moto.server import ThreadedMotoServer

from cachingproxy.app import create_app, server_kwargs
from cachingproxy.appkeys import SITES
from cachingproxy.config import Config, parse_config
from cachingproxy.namespace import NamespacedStore
from cachingproxy.service import CachingProxy

from .shim import Shim

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# The suite must never pick up a developer's real AWS profile or config.
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull

START = 1_700_000_000.0

# The real app on a real socket, as the `proxy` and `make_proxy` fixtures give it to a test.
ProxyClient = TestClient[web.Request, web.Application]


class FakeClock:
    """The proxy's notion of "now"; tests advance it instead of sleeping."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# How long a test waits for a condition before failing. Generous (a loaded 2-core box): it is only reached when
# the test is failing anyway, so it costs nothing when things work.
DEADLINE = 10.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition()` holds, for proxy state that offers no event to wait on; fail after DEADLINE."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not condition():  # noqa: ASYNC110 -- polled: the condition has no event to wait on
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {DEADLINE} s: {what}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(moto_url: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")


class Bucket:
    """A fresh bucket per test, written to directly (not through the shim, so counts stay clean)."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name

    def put(self, key: str, body: bytes, **extra: Any) -> str:
        resp = self.client.put_object(Bucket=self.name, Key=key, Body=body, **extra)
        etag: str = resp["ETag"]
        return etag

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)

    def copy_metadata(self, key: str, **extra: Any) -> None:
        """Change headers only (same body, same ETag), as `aws s3 cp --metadata-directive REPLACE` does."""
        self.client.copy_object(Bucket=self.name, Key=key, CopySource={"Bucket": self.name, "Key": key},
                                MetadataDirective="REPLACE", **extra)


@pytest.fixture
def bucket(s3_client: Any) -> Bucket:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return Bucket(s3_client, name)


@pytest.fixture
async def shim(moto_url: str, bucket: Bucket) -> AsyncIterator[Shim]:
    s = Shim(moto_url, bucket.name)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def config_for(tmp_path: Path, endpoint: str, bucket: str, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "server": {"mount": "/docs"},
        "s3": {"bucket": bucket, "endpoint_url": endpoint, "addressing_style": "path", "max_attempts": 1,
               # Generous: the tests that want a timeout set their own, and the rest must never see one.
               # CI once saw the in-process moto server pause for 2 s on a loaded 2-core box, which turned
               # a plain 404 into a 504 under a 2 s read timeout.
               "connect_timeout": 5.0, "read_timeout": 10.0, "request_timeout": 15.0},
        "cache": {"directory": str(tmp_path / "cache"), "ttl": 60},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "test")


MakeProxy = Callable[..., Awaitable[ProxyClient]]


@pytest.fixture
def make_proxy(aiohttp_client: AiohttpClient, tmp_path: Path, shim: Shim, bucket: Bucket,
               clock: FakeClock) -> MakeProxy:
    """Start the real app on a real socket in front of the shim; keyword arguments override config sections."""

    async def make(leader: bool = True, **sections: dict[str, Any]) -> ProxyClient:
        config = config_for(tmp_path, shim.url, bucket.name, **sections)
        # TestServer(**kwargs) drops its kwargs; start_server(**kwargs) hands them to the AppRunner.
        server = TestServer(create_app(config, clock=clock, leader=leader))
        await server.start_server(**server_kwargs(config))
        # aiohttp types a client of a prebuilt server as TestClient[BaseRequest, None]; this one serves an app.
        return cast(ProxyClient, await aiohttp_client(server))

    return make


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> ProxyClient:
    return await make_proxy()


async def raw_request(client: ProxyClient, target: str, method: str = "GET",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send one request line exactly as written (no client-side normalisation of `..` or `//`)."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


def service_of(client: TestClient[Any, Any] | TestServer) -> CachingProxy:
    """The service of a single-site proxy (the "default" site, or the first of [[sites]])."""
    return client.app[SITES].first.service


def store_of(client: TestClient[Any, Any]) -> NamespacedStore:
    """The cache as a single-site proxy's service sees it: plain S3 keys, under that site's namespace."""
    return client.app[SITES].first.store

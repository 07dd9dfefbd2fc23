"""A wrong bucket, endpoint or credentials: one clear line at start, the proxy still starts, /readyz says which,
and a missing bucket's 404s are logged (once a minute) and never negative-cached as missing keys."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from cachingproxy.app import create_app, server_kwargs

from .conftest import Bucket, FakeClock, config_for, free_port
from .shim import Fault, Shim
from .test_workers import next_line_with, serving, write_config


async def test_a_missing_bucket_is_404_logged_once_a_minute_and_not_remembered_as_missing_keys(
        aiohttp_client: Any, tmp_path: Path, moto_url: str, s3_client: Any, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    name = f"t-{uuid.uuid4().hex[:16]}"  # not created yet
    config = config_for(tmp_path, moto_url, name, cache={"negative_ttl": 3600})
    server = TestServer(create_app(config, clock=clock))
    await server.start_server(**server_kwargs(config))
    proxy = await aiohttp_client(server)
    with caplog.at_level(logging.ERROR, logger="cachingproxy.app"):
        assert (await proxy.get("/docs/a.html")).status == 404
        assert (await proxy.get("/docs/b.html")).status == 404
        assert (await proxy.head("/docs/a.html")).status == 404
    said = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert said == [f'404: bucket "{name}" does not exist at {moto_url} (logged once a minute)']
    resp = await proxy.get("/readyz")
    assert (resp.status, await resp.json()) == (503, {"status": "unavailable", "cache": "ok", "s3": "no such bucket",
                                                      "reason": "the bucket does not exist"})

    s3_client.create_bucket(Bucket=name)  # fixed: no negative_ttl (an hour here) to wait out
    s3_client.put_object(Bucket=name, Key="a.html", Body=b"now it is here")
    resp = await proxy.get("/docs/a.html")
    assert (resp.status, await resp.read()) == (200, b"now it is here")
    assert (await proxy.head("/docs/a.html")).status == 200


@pytest.mark.parametrize("case", ["no such bucket", "unreachable", "rejected", "no credentials"])
async def test_the_start_log_says_what_is_wrong_with_the_bucket_and_the_proxy_still_starts(
        case: str, tmp_path: Path, moto_url: str, bucket: Bucket, shim: Shim,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bucket.put("a.html", b"a")
    endpoint, name = shim.url, bucket.name
    if case == "no such bucket":
        endpoint, name = moto_url, "no-such-bucket"
        expected = f'bucket "no-such-bucket" at {moto_url}: does not exist'
    elif case == "unreachable":
        endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        expected = f'bucket "{name}" at {endpoint}: endpoint unreachable ('
    elif case == "rejected":
        shim.fault = Fault(status=403, code="InvalidAccessKeyId")
        expected = f'bucket "{name}" at {endpoint}: credentials rejected (InvalidAccessKeyId)'
    else:
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup: loopback only
        expected = f'bucket "{name}" at {endpoint}: no credentials found'
    port = free_port()
    async with serving(write_config(tmp_path, port, endpoint, name, workers=1)) as (proc, _, log):
        line = await next_line_with(log, f'bucket "{name}" at ')
        assert expected in line and " ERROR " in line, line
        assert proc.returncode is None  # still serving
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = (await reader.read()).decode()
        writer.close()
        state = {"no such bucket": "no such bucket", "unreachable": "unreachable", "rejected": "denied",
                 "no credentials": "denied"}[case]
        assert answer.startswith("HTTP/1.1 503") and f'"s3": "{state}"' in answer, answer

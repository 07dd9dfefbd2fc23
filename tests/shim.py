"""A real HTTP shim between the proxy and moto: counts S3 requests by operation and injects faults.

Modes are set per test on `Shim.fault` (or per key with `Shim.faults[key]`); see `Fault`.
"""

from __future__ import annotations

import asyncio
import collections
import random
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import ClientSession, web

__all__ = ["Fault", "Shim"]

_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


@dataclass
class Fault:
    status: int = 0  # answer this status with an S3 error body (a body-less one for HEAD)
    code: str = ""  # S3 error code for `status`, e.g. "SlowDown", "AccessDenied", "ExpiredToken"
    delay: float = 0.0  # seconds before forwarding
    blackhole: bool = False  # accept and never answer (until `Shim.close_hanging`: then forward as usual)
    truncate_after: int = -1  # send this many body bytes (Content-Length kept), then cut the connection
    stall_after: int = -1  # send this many body bytes, then wait for `Shim.release` before the rest
    flip_byte: bool = False  # same length, one byte changed
    etag: str = ""  # replace the ETag S3 sent
    sse_kms: bool = False  # add x-amz-server-side-encryption: aws:kms
    last_modified: str = ""  # replace the Last-Modified S3 sent (moto stamps every object with its upload time)
    no_checksum: bool = False  # drop x-amz-checksum-* (an object uploaded without one): only the MD5 can tell
    ops: frozenset[str] = frozenset({"GET", "HEAD", "LIST"})  # which operations the fault applies to


class Shim:
    def __init__(self, upstream: str, bucket: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.bucket = bucket
        self.counts: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str]] = []  # (operation, key)
        self.headers: list[dict[str, str]] = []  # each request's headers, in the order of `log`
        self.in_flight = 0  # requests being handled now, and the most there ever were at once
        self.max_in_flight = 0
        self.fault: Fault | None = None
        self.faults: dict[str, Fault] = {}
        self._session: ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        self._never = asyncio.Event()
        self.release = asyncio.Event()  # lets a `stall_after` body continue
        self.arrived = asyncio.Event()  # set by every request; clear it to wait for the next one
        self.held = 0  # requests a blackhole is holding now (`close_hanging` lets them all go)
        self._held_changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_counts(self) -> None:
        self.counts.clear()
        self.log.clear()
        self.headers.clear()

    def operation(self, request: web.Request) -> tuple[str, str]:
        path = unquote(request.raw_path.partition("?")[0])
        _, _, rest = path.lstrip("/").partition("/")
        if request.method == "GET" and not rest:
            return "LIST", request.query.get("prefix", "")
        return {"GET": "GET", "HEAD": "HEAD"}.get(request.method, request.method), rest

    async def start(self) -> None:
        self._session = ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await self.listen()

    async def listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def refuse(self) -> None:
        """Stop listening: new connections get ECONNREFUSED (pooled ones are closed too)."""
        assert self._site is not None and self._runner is not None
        await self._site.stop()
        for conn in list(self._runner.server.connections) if self._runner.server else []:
            conn.force_close()

    async def close_hanging(self) -> None:
        """Let blackholed requests go on to be forwarded normally (later ones are held again)."""
        self._never.set()
        self._never = asyncio.Event()
        self.held = 0

    async def wait_held(self, n: int) -> None:
        """Return once `n` requests are being held by a blackhole: a condition to wait on instead of a sleep.

        The caller bounds the wait (`asyncio.timeout`).
        """
        async with self._held_changed:
            await self._held_changed.wait_for(lambda: self.held >= n)

    async def close(self) -> None:
        self._never.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        op, key = self.operation(request)
        self.counts[op] += 1
        self.arrived.set()
        self.log.append((op, key))
        self.headers.append(dict(request.headers))
        fault = self.faults.get(key, self.fault)
        if fault is not None and op not in fault.ops:
            fault = None
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.blackhole:
                async with self._held_changed:
                    never = self._never  # the one `close_hanging` sets next, as `held` counts this request
                    self.held += 1
                    self._held_changed.notify_all()
                await never.wait()
            elif fault.status:
                if request.method == "HEAD":
                    return web.Response(status=fault.status)
                body = f"<?xml version='1.0'?><Error><Code>{fault.code}</Code><Message>injected</Message></Error>"
                return web.Response(status=fault.status, text=body, content_type="application/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body_in = await request.read()
        async with self._session.request(request.method, self.upstream + request.raw_path, headers=headers,
                                         data=body_in or None, allow_redirects=False) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            if fault is not None and fault.etag and "ETag" in out:
                out["ETag"] = fault.etag
            if fault is not None and fault.last_modified and "Last-Modified" in out:
                out["Last-Modified"] = fault.last_modified
            if fault is not None and fault.no_checksum:
                out = {k: v for k, v in out.items() if not k.lower().startswith("x-amz-checksum-")}
            if fault is not None and fault.sse_kms:
                out["x-amz-server-side-encryption"] = "aws:kms"
            payload = await upstream.read()
        if fault is not None and fault.flip_byte and payload:
            i = random.Random(len(payload)).randrange(len(payload))
            payload = payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1:]
        resp = web.StreamResponse(status=upstream.status, headers=out)
        if request.method == "HEAD":
            resp.content_length = int(upstream.headers.get("Content-Length", "0"))
            await resp.prepare(request)
            return resp
        resp.content_length = len(payload)
        await resp.prepare(request)
        if fault is not None and fault.truncate_after >= 0:
            await resp.write(payload[: fault.truncate_after])
            if request.transport is not None:  # None: the proxy has already gone, which cuts it as well
                request.transport.abort()
            return resp
        if fault is not None and fault.stall_after >= 0:
            await resp.write(payload[: fault.stall_after])
            await self.release.wait()
            payload = payload[fault.stall_after:]
        await resp.write(payload)
        await resp.write_eof()
        return resp

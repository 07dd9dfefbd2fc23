"""Writing an object response: conditionals and ranges applied, then one write from memory, sendfile from the
cached file, or the bytes of a fill as they arrive; and the honest ways to end a response that cannot finish."""

from __future__ import annotations

import asyncio
import logging
import zlib

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .appkeys import BODY_SENT, CLOCK, CONFIG, SITE, STORE
from .compressed import (
    ON_DISK,
    Coded,
    coded_headers,
    count,
    gunzipped,
    negotiation,
    pick_variant,
    plan_for,
    send_coded,
    variant_in_memory,
)
from .conditional import Plan, evaluate
from .fill import FileSpan
from .freshness import REDIRECT_CACHE_CONTROL, ClientFreshness, age
from .headers import not_modified
from .hitpath import memo_headers, reset, send_file
from .models import HeldBody, ObjectMeta
from .origin import OriginError
from .policy import ttl_left
from .service import FromCache, FromFill, FromHead, Resolved
from .website import redirect_target

__all__ = ["OUTCOME_HEADERS", "from_memory", "respond", "response_headers"]

log = logging.getLogger(__name__)

OUTCOME_HEADERS = ("X-Cache", "Age", "Cache-Status")  # on every response that comes from an object


def _plan(request: web.Request, meta: ObjectMeta, *, conditional: bool, status: int) -> Plan:
    if conditional:
        return evaluate(request.method, request.headers, etag=meta.etag, last_modified=meta.last_modified,
                        size=meta.size)
    return Plan(status=status, start=0, end=meta.size)


def _with(headers: CIMultiDictProxy[str], plan: Plan) -> CIMultiDictProxy[str] | CIMultiDict[str]:
    if not plan.content_range:
        return headers
    ranged = CIMultiDict(headers)
    ranged["Content-Range"] = plan.content_range
    return ranged


def from_memory(request: web.Request, resolved: FromCache, ttl: float, client: ClientFreshness | None, *,
                 conditional: bool, status: int, headers: CIMultiDictProxy[str] | None = None) -> web.Response | None:
    """A GET of a small body held in memory: a Response sends head and body in one write (one syscall, one
    segment); a StreamResponse sends its head alone at prepare(), which doubled a hit's send cost.

    None: a gzip-stored body for a client without gzip, which respond() decompresses, or a stored variant this
    worker has not read yet, which respond() opens."""
    body = resolved.body
    assert isinstance(body, HeldBody)
    meta = resolved.entry.meta
    varies = False
    if headers is None:
        assert client is not None
        now = request.app[CLOCK]()
        headers = response_headers(resolved, ttl, client, now)
        neg = negotiation(request, meta)
        if neg is not None:
            if neg.gunzip:
                return None  # decompressed by respond(), streaming
            coded = variant_in_memory(request, resolved.entry) if neg.coding else None
            if coded == ON_DISK:
                return None  # respond() opens it (pick_variant), and this worker keeps it in memory after
            if coded is not None:
                return _coded_from_memory(request, meta, coded, coded_headers(headers, coded.coding, now),
                                          conditional=conditional, status=status)
            headers = coded_headers(headers, "identity", now)
            varies = True
    plan = (plan_for(request, meta, meta.size, conditional=conditional, status=status, ranged=True) if varies
            else _plan(request, meta, conditional=conditional, status=status))
    if plan.status in (304, 412, 416):
        return _bodiless(plan, headers)
    if plan.end - plan.start != len(body):
        body = body[plan.start : plan.end]
    request[BODY_SENT] = len(body)
    # bytes: aiohttp sends a bytes body with the head in one write, and anything else through its payload layer
    return web.Response(status=plan.status, headers=_with(headers, plan), body=bytes(body))


def _coded_from_memory(request: web.Request, meta: ObjectMeta, coded: Coded, headers: CIMultiDictProxy[str], *,
                       conditional: bool, status: int) -> web.Response:
    assert isinstance(coded.body, HeldBody)
    plan = plan_for(request, meta, coded.size, conditional=conditional, status=status, ranged=False)
    if plan.status in (304, 412):
        return _bodiless(plan, headers)
    request[BODY_SENT] = coded.size
    count(request, coded.coding, coded.size, meta.size)
    return web.Response(status=plan.status, headers=headers, body=bytes(coded.body))


async def respond(request: web.Request, resolved: Resolved, ttl: float, client: ClientFreshness | None, *,
                   conditional: bool, status: int = 200,
                   headers: CIMultiDictProxy[str] | None = None) -> web.StreamResponse:
    """`headers`: sent instead of the object's own (a 404 with the error document); else `client` is needed."""
    meta = resolved.entry.meta if isinstance(resolved, FromCache) else resolved.meta
    location = _website_redirect(request, meta.redirect) if meta.redirect else None
    if location is not None:
        await _release(request, resolved)
        control = client.redirect if client is not None else REDIRECT_CACHE_CONTROL
        raise web.HTTPMovedPermanently(location=location, headers={"Cache-Control": control})
    if isinstance(resolved, FromCache) and isinstance(resolved.body, HeldBody) and request.method == "GET":
        answer = from_memory(request, resolved, ttl, client, conditional=conditional, status=status,
                             headers=headers)
        if answer is not None:
            return answer
    body = resolved.body if isinstance(resolved, FromCache) else None
    varies = False
    try:
        if headers is None:
            assert client is not None
            now = request.app[CLOCK]()
            headers = response_headers(resolved, ttl, client, now)
            neg = negotiation(request, meta)
            if neg is not None and neg.gunzip:
                return await _gunzip(request, resolved, meta, coded_headers(headers, "gunzip", now),
                                     conditional=conditional, status=status)
            if neg is not None and neg.coding and isinstance(resolved, FromCache):
                coded = await pick_variant(request, resolved.entry)
                if coded is not None:
                    return await _send_coded(request, meta, coded, coded_headers(headers, coded.coding, now),
                                             conditional=conditional, status=status)
            if neg is not None:
                headers = coded_headers(headers, "identity", now)
                varies = True
        plan = (plan_for(request, meta, meta.size, conditional=conditional, status=status, ranged=True) if varies
                else _plan(request, meta, conditional=conditional, status=status))
        if plan.status in (304, 412, 416):
            return _bodiless(plan, headers)
        resp = web.StreamResponse(status=plan.status, headers=_with(headers, plan))
        resp.content_length = plan.end - plan.start
        await resp.prepare(request)
        stall = request.app[CONFIG].server.send_timeout
        try:
            if request.method == "HEAD":
                pass
            elif isinstance(resolved, FromCache):
                assert body is not None and not isinstance(body, HeldBody)  # a GET of a held body returned above
                if plan.end > plan.start:
                    await send_file(request, body, plan.start, plan.end - plan.start, stall)
            elif isinstance(resolved, FromFill):
                async for piece in resolved.fill.read(plan.start, plan.end):
                    if isinstance(piece, FileSpan):
                        await send_file(request, piece.fd, piece.offset, piece.count, stall)
                        continue
                    async with asyncio.timeout(stall):
                        await resp.write(piece)
            else:
                assert isinstance(resolved, FromHead)
            async with asyncio.timeout(stall):
                await _write_eof_flushed(request, resp)
        except (OriginError, ConnectionError):
            # S3 failed with headers and part of the body out: the only honest signal left is to cut the
            # connection, so the client sees a short body instead of a complete-looking wrong one. Or the
            # reader went away (a closed tab, a cancelled download): not an error of ours, and let out of the
            # handler it would be logged by aiohttp with a traceback.
            reset(request)
            return resp
        except TimeoutError:
            # nginx's send_timeout: a client that takes nothing for this long (a zero TCP window holds a
            # connection open for ever) gives up its connection, its open file and its place in a fill.
            log.info("client took no bytes for %.0f s: connection dropped", stall)
            reset(request)
            return resp
        if request.method == "GET":
            request[BODY_SENT] = plan.end - plan.start
        return resp
    finally:
        await _release(request, resolved)


async def _send_coded(request: web.Request, meta: ObjectMeta, coded: Coded, headers: CIMultiDictProxy[str], *,
                      conditional: bool, status: int) -> web.StreamResponse:
    """A stored variant, whole (a Range is answered from the identity body, so none reaches here)."""
    store = request[SITE].store
    try:
        plan = plan_for(request, meta, coded.size, conditional=conditional, status=status, ranged=False)
        if plan.status in (304, 412):
            return _bodiless(plan, headers)
        resp = web.StreamResponse(status=plan.status, headers=headers)
        resp.content_length = coded.size
        await resp.prepare(request)
        stall = request.app[CONFIG].server.send_timeout
        try:
            if request.method == "GET":
                await send_coded(request, resp, coded, stall)
            async with asyncio.timeout(stall):
                await _write_eof_flushed(request, resp)
        except ConnectionError:  # the reader went away (see respond)
            reset(request)
            return resp
        except TimeoutError:
            log.info("client took no bytes for %.0f s: connection dropped", stall)
            reset(request)
            return resp
        if request.method == "GET":
            request[BODY_SENT] = coded.size
            count(request, coded.coding, coded.size, meta.size)
        return resp
    finally:
        await store.close_body(coded.body)


async def _gunzip(request: web.Request, resolved: Resolved, meta: ObjectMeta, headers: CIMultiDictProxy[str], *,
                  conditional: bool, status: int) -> web.StreamResponse:
    """An object S3 stores gzip-encoded, for a client that does not take gzip: decompressed as it streams,
    whole (chunked: its length is not known until the end), under its own ETag."""
    try:
        plan = plan_for(request, meta, meta.size, conditional=conditional, status=status, ranged=False)
        if plan.status in (304, 412):
            return _bodiless(plan, headers)
        resp = web.StreamResponse(status=plan.status, headers=headers)
        await resp.prepare(request)
        if request.method != "GET":
            await resp.write_eof()
            return resp
        stall = request.app[CONFIG].server.send_timeout
        sent = 0
        pieces = resolved.fill.read(0, meta.size) if isinstance(resolved, FromFill) else None
        body = resolved.body if isinstance(resolved, FromCache) else None
        try:
            async for chunk in gunzipped(body, pieces):
                async with asyncio.timeout(stall):
                    await resp.write(chunk)
                sent += len(chunk)
            async with asyncio.timeout(stall):
                await _write_eof_flushed(request, resp)
        except (OriginError, zlib.error, TimeoutError, ConnectionError):
            # Not gzip after all, truncated, a stalled client or one gone: the head is out, so cut the
            # connection rather than end a body that looks complete.
            reset(request)
            return resp
        request[BODY_SENT] = sent
        return resp
    finally:
        await _release(request, resolved)


async def _release(request: web.Request, resolved: Resolved) -> None:
    """Give back what a resolved answer holds: an open cached file, or a place in a fill."""
    if isinstance(resolved, FromCache) and resolved.body is not None:
        await request.app[STORE].close_body(resolved.body)
    elif isinstance(resolved, FromFill):
        resolved.fill.leave()


def _website_redirect(request: web.Request, value: str) -> str | None:
    """Where an object stored with x-amz-website-redirect-location sends the reader (301, as S3 website
    hosting does); None, with a log line, for a value that is neither a path nor an http(s) URL."""
    site = request[SITE]
    location = redirect_target(site.config.mount, value)
    if location is None:
        log.warning("site %s: ignoring a website redirect that is neither a path nor an http(s) URL", site.name)
    return location


def _bodiless(plan: Plan, headers: CIMultiDictProxy[str]) -> web.Response:
    if plan.status == 304:
        return web.Response(status=304, headers=not_modified(headers))
    # The object was looked up, so the outcome applies here too.
    extra = {name: headers[name] for name in OUTCOME_HEADERS}
    if plan.content_range:
        extra["Content-Range"] = plan.content_range
    text = "Range Not Satisfiable\n" if plan.status == 416 else "Precondition Failed\n"
    return web.Response(status=plan.status, text=text, headers=extra)


async def _write_eof_flushed(request: web.Request, resp: web.StreamResponse) -> None:
    """End the response once its last bytes have left the transport's buffer for the kernel.

    Otherwise the handler can return with a body tail still buffered in the loop, and a graceful shutdown
    (SIGTERM) closes the connection under it: the client gets a short body (tests/test_crash.py, row 37).
    With a zero high-water mark the transport pauses until its buffer is empty, and write_eof's drain waits
    for that. Only a response with bytes still buffered pays for it; small hits leave in one write.
    """
    transport = request.transport
    if transport is None or transport.get_write_buffer_size() == 0:
        await resp.write_eof()
        return
    transport.set_write_buffer_limits(high=0)
    try:
        await resp.write_eof()
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits()  # the loop's defaults again, for the next request


def response_headers(resolved: Resolved, ttl: float, client: ClientFreshness, now: float) -> CIMultiDictProxy[str]:
    """The object's headers plus X-Cache, the stored Date with Age (RFC 9111 §4.2.3, freshness.py) and
    Cache-Status (RFC 9211); read-only, since they are shared: a Response copies them, anyone adding a
    header copies first. A miss gets Age 0 and aiohttp's Date (now)."""
    if isinstance(resolved, FromCache):
        entry = resolved.entry
        return memo_headers(entry.meta, resolved.outcome, age(entry.checked_at, now), int(ttl_left(entry, ttl, now)),
                            int(entry.checked_at), client, now)
    return memo_headers(resolved.meta, resolved.outcome, 0, None, None, client, now)

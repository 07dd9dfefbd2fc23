"""The aiohttp application: routes, lifetimes, the GET/HEAD handler and the two body writers."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from .accesslog import StructuredAccessLogger, track_s3_calls
from .admin import mount_admin, start_admin_listener
from .appkeys import BODY_SENT, CLOCK, CONFIG, COUNTERS, ORIGIN, SERVICE, STARTED, STORE, TALLY
from .conditional import Plan, evaluate
from .config import Config
from .counters import NAMES as COUNTER_NAMES
from .counters import Counters
from .keys import Key, Redirect, Reject, index_key, redirect_location, request_key
from .metrics import SLOTS as METRIC_SLOTS
from .models import Clock, ObjectMeta, Outcome
from .monitoring import OPS, Ops, add_monitoring_routes
from .origin import ObjectMissing, OriginDenied, OriginError, OriginTimeout, open_origin
from .policy import ttl_left, windows_for
from .service import CachingProxy, FromCache, FromFill, FromHead, Resolved
from .store import CacheStore
from .tally import Slab, Tally

__all__ = ["create_app", "server_kwargs"]

log = logging.getLogger(__name__)

LEADER = web.AppKey("leader", bool)


# RFC 9110 §15.4.5: a 304 carries the validators and caching headers a 200 would.
NOT_MODIFIED_HEADERS = frozenset({"ETag", "Last-Modified", "Cache-Control", "Expires", "Content-Location",
                                  "X-Cache", "Age", "Cache-Status"})
CACHE_STATUS = "cachingproxy"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error boundary: short plain-text statuses, never a traceback or anything S3 said."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ObjectMissing:
        raise web.HTTPNotFound(text="Not Found\n") from None
    except OriginTimeout:
        raise web.HTTPGatewayTimeout(text="Gateway Timeout: the object store did not answer in time\n") from None
    except OriginError:
        raise web.HTTPBadGateway(text="Bad Gateway: the object store is unavailable\n") from None
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error")
        raise web.HTTPInternalServerError(text="Internal Server Error\n") from None


def _response_headers(resolved: Resolved, ttl: float, now: float) -> CIMultiDictProxy[str]:
    """The object's headers plus X-Cache, Age (RFC 9111 §4) and Cache-Status (RFC 9211); read-only, since
    they are shared: a Response copies them, anyone adding a header copies first."""
    if isinstance(resolved, FromCache):
        entry = resolved.entry
        return _headers(entry.meta, resolved.outcome, max(0, int(now - entry.checked_at)),
                        int(ttl_left(entry, ttl, now)))
    return _headers(resolved.meta, resolved.outcome, 0, None)


@functools.lru_cache(maxsize=4096)
def _headers(meta: ObjectMeta, outcome: Outcome, age: int, left: int | None) -> CIMultiDictProxy[str]:
    # Memoised: within a second every hit on an object gets the same headers, and building them (dates,
    # strings, a multidict) cost more than the rest of a hit from memory.
    headers: CIMultiDict[str] = CIMultiDict(meta.headers)
    headers.setdefault("Content-Type", "binary/octet-stream")  # what S3 itself sends without one
    if meta.etag:
        headers["ETag"] = meta.etag
    if meta.last_modified is not None:
        headers["Last-Modified"] = email.utils.formatdate(meta.last_modified, usegmt=True)
    headers["Accept-Ranges"] = "bytes"
    headers["X-Cache"] = outcome.value
    headers["Age"] = str(age)
    status = {
        Outcome.HIT: f"hit; ttl={left}",
        Outcome.REVALIDATED: f"fwd=stale; fwd-status=304; ttl={left}",
        Outcome.STALE: f"hit; ttl={left}; detail=stale-if-error",
    }.get(outcome, "fwd=miss; fwd-status=200")
    headers["Cache-Status"] = f"{CACHE_STATUS}; {status}"
    return CIMultiDictProxy(headers)


def _request_key(raw_path: str, config: Config) -> Key | Reject | Redirect:
    if len(raw_path) > _MEMO_PATH:
        return request_key(raw_path, mount=config.server.mount, prefix=config.s3.prefix,
                           index_document=config.cache.index_document)
    return _memo_request_key(raw_path, config.server.mount, config.s3.prefix, config.cache.index_document)


_MEMO_PATH = 512  # longer paths are decoded every time, so hostile ones cannot make the memo below large


@functools.lru_cache(maxsize=4096)
def _memo_request_key(raw_path: str, mount: str, prefix: str, index_document: str) -> Key | Reject | Redirect:
    return request_key(raw_path, mount=mount, prefix=prefix, index_document=index_document)


async def serve_object(request: web.Request) -> web.StreamResponse:
    request[STARTED] = time.perf_counter()
    if request.body_exists:
        # RFC 9110 §9.3.1: a GET body has no meaning, and a front proxy may frame it differently (request
        # smuggling, RELIABILITY.md §4). Refuse it and close, so no byte after it is read as a request.
        refusal = web.HTTPBadRequest(text="Bad Request: GET and HEAD take no body\n")
        refusal.force_close()
        raise refusal
    config = request.app[CONFIG]
    key = _request_key(request.raw_path, config)
    if isinstance(key, Redirect):
        raise web.HTTPMovedPermanently(location=key.location)
    if isinstance(key, Reject):
        raise (web.HTTPBadRequest if key.status == 400 else web.HTTPNotFound)(text=key.reason + "\n")
    service = request.app[SERVICE]
    windows = windows_for(key.s3_key[len(config.s3.prefix):], config.cache)
    ttl = windows.ttl
    want_body = request.method == "GET"
    if want_body:
        hit = service.hit_in_memory(key.s3_key, ttl=ttl)
        if hit is not None:
            # Most requests end here: nothing awaited, no S3 request possible, one write.
            return _from_memory(request, hit, ttl, conditional=True, status=200)
    track_s3_calls(request)
    try:
        resolved = await service.resolve(key.s3_key, windows=windows, want_body=want_body)
    except OriginDenied as exc:
        # A GET's AccessDenied is what S3 says for a missing key to a reader without s3:ListBucket; a
        # body-less HEAD 403 on a cold key is read the same way so HEAD and GET agree.
        if want_body and not exc.proves_absence:
            raise
        return await _not_found(request, key)
    except ObjectMissing:
        return await _not_found(request, key)
    return await _respond(request, resolved, ttl, conditional=True)


async def _not_found(request: web.Request, key: Key) -> web.StreamResponse:
    config = request.app[CONFIG]
    service = request.app[SERVICE]
    if not key.directory and await service.exists(index_key(key, config.cache.index_document)):
        # S3 website behaviour: `dir` -> `dir/` so that relative links in dir/index.html resolve.
        raise web.HTTPMovedPermanently(location=redirect_location(key, mount=config.server.mount))
    error_document = config.cache.error_document
    if error_document:
        error_key = config.s3.prefix + error_document
        windows = windows_for(error_document, config.cache)
        try:
            resolved = await service.resolve(error_key, windows=windows, want_body=request.method == "GET")
        except OriginError:
            pass
        else:
            return await _respond(request, resolved, windows.ttl, conditional=False, status=404)
    raise web.HTTPNotFound(text="Not Found\n")


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


def _from_memory(request: web.Request, resolved: FromCache, ttl: float, *, conditional: bool,
                 status: int) -> web.Response:
    """A GET of a small body held in memory: a Response sends head and body in one write (one syscall, one
    segment); a StreamResponse sends its head alone at prepare(), which doubled a hit's send cost."""
    body = resolved.body
    assert isinstance(body, bytes)
    meta = resolved.entry.meta
    headers = _response_headers(resolved, ttl, request.app[CLOCK]())
    plan = _plan(request, meta, conditional=conditional, status=status)
    if plan.status in (304, 412, 416):
        return _bodiless(plan, headers)
    if plan.end - plan.start != len(body):
        body = body[plan.start : plan.end]
    request[BODY_SENT] = len(body)
    return web.Response(status=plan.status, headers=_with(headers, plan), body=body)


async def _respond(request: web.Request, resolved: Resolved, ttl: float, *, conditional: bool,
                   status: int = 200) -> web.StreamResponse:
    if isinstance(resolved, FromCache) and isinstance(resolved.body, bytes) and request.method == "GET":
        return _from_memory(request, resolved, ttl, conditional=conditional, status=status)
    body = resolved.body if isinstance(resolved, FromCache) else None
    try:
        meta = resolved.entry.meta if isinstance(resolved, FromCache) else resolved.meta
        headers = _response_headers(resolved, ttl, request.app[CLOCK]())
        plan = _plan(request, meta, conditional=conditional, status=status)
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
                assert body is not None and not isinstance(body, bytes)  # a GET of a bytes body returned above
                if plan.end > plan.start:
                    await _send_file(request, body, plan.start, plan.end - plan.start, stall)
            elif isinstance(resolved, FromFill):
                async for chunk in request.app[SERVICE].read(resolved.fill, plan.start, plan.end):
                    async with asyncio.timeout(stall):
                        await resp.write(chunk)
            else:
                assert isinstance(resolved, FromHead)
            async with asyncio.timeout(stall):
                await _write_eof_flushed(request, resp)
        except OriginError:
            # Headers and part of the body are out: the only honest signal left is to cut the
            # connection, so the client sees a short body instead of a complete-looking wrong one.
            _abort(request)
            return resp
        except TimeoutError:
            # nginx's send_timeout: a client that takes nothing for this long (a zero TCP window holds a
            # connection open for ever) gives up its connection, its open file and its place in a fill.
            log.info("client took no bytes for %.0f s: connection dropped", stall)
            _abort(request)
            return resp
        if request.method == "GET":
            request[BODY_SENT] = plan.end - plan.start
        return resp
    finally:
        if body is not None:
            await request.app[STORE].close_body(body)
        if isinstance(resolved, FromFill):
            request.app[SERVICE].release(resolved.fill)


def _bodiless(plan: Plan, headers: CIMultiDictProxy[str]) -> web.Response:
    if plan.status == 304:
        kept: CIMultiDict[str] = CIMultiDict((k, v) for k, v in headers.items() if k in NOT_MODIFIED_HEADERS)
        return web.Response(status=304, headers=kept)
    extra = {"Content-Range": plan.content_range} if plan.content_range else {}
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


def _abort(request: web.Request) -> None:
    """Reset the connection. SO_LINGER 0 makes the close an RST that also drops what the kernel still holds
    for the client (as nginx's reset_timedout_connection); a plain close would queue a FIN behind megabytes
    a stalled client never reads, keeping the socket alive in the kernel."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()


_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


async def _send_file(request: web.Request, body: BinaryIO, offset: int, count: int, stall: float) -> None:
    """sendfile(2) from the cached file under our own validators (aiohttp's FileResponse invents its own),
    never copied in Python; TimeoutError when the client takes nothing for `stall` seconds.

    Bodies held in memory never get here: `_respond` sends them with their headers in one write. The socket
    is reached through a dup of its fd, because uvloop has no loop.sendfile (uvloop#228) and refuses
    add_writer on an fd one of its transports owns; both fds are the same socket, so the bytes stay in order
    as long as nothing else writes meanwhile, which holds: this handler is the only writer of its connection.
    The standard loop takes the same path, so tests run what production runs.
    """
    loop = asyncio.get_running_loop()
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise ConnectionResetError("client went away")
    async with asyncio.timeout(stall):
        await _drained(transport)
    fd = body.fileno()
    out = os.dup(sock.fileno())
    try:
        while count > 0:
            try:
                sent = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                sent = -1
            if sent == 0:
                raise ConnectionResetError("cached body shrank while being sent")
            if sent > 0:
                offset += sent
                count -= sent
                continue
            writable = loop.create_future()
            loop.add_writer(out, _wake, writable)
            try:
                async with asyncio.timeout(stall):
                    await writable
            finally:
                loop.remove_writer(out)
            if transport.is_closing():
                raise ConnectionResetError("client went away")
    finally:
        os.close(out)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _drained(transport: asyncio.Transport) -> None:
    """Until the transport's write buffer is empty: at most the response head, which almost always left at once."""
    while transport.get_write_buffer_size() > 0:
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        await asyncio.sleep(0.001)


# -- lifetimes ----------------------------------------------------------------------------------------


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cache = app[CONFIG].cache
    store = CacheStore(cache.directory, cache.size_limit_mb * 1024 * 1024, verify_on_read=cache.verify_on_read,
                       tally=app[TALLY])
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _origin_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_origin(app[CONFIG].s3, app[COUNTERS]) as origin:
        app[ORIGIN] = origin
        yield


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    service = CachingProxy(app[CONFIG], app[STORE], app[ORIGIN], app[CLOCK], app[COUNTERS])
    app[SERVICE] = service
    yield
    await service.close(grace=app[CONFIG].server.shutdown_timeout)


async def _ops_ctx(app: web.Application) -> AsyncIterator[None]:
    """Monitoring and the admin API; with several workers only the leader (`leader=True`, see workers.py)
    opens the admin listener and runs mirror mode."""
    config = app[CONFIG]
    ops = app[OPS] = Ops(config, app[CLOCK], app[STORE], app[ORIGIN], app[SERVICE], app[TALLY])
    leader = app[LEADER]
    runner: web.AppRunner | None = None
    try:
        runner = await start_admin_listener(config, ops, leader=leader)
        if config.admin.warm_prefixes and leader:
            ops.warmer.start_mirror(config.admin.warm_prefixes, config.admin.warm_interval)
        yield
    finally:
        await ops.close()
        if runner is not None:
            await runner.cleanup()


async def _close_after_upgrade(request: web.Request, response: web.StreamResponse) -> None:
    """We never switch protocols (RFC 9110 §7.8 lets a server ignore Upgrade), but a front proxy that does
    not check for 101 may now treat the connection as a raw tunnel: close it, so nothing sent after this
    request is ever read as a new one (websocket/h2c smuggling)."""
    if "Upgrade" in request.headers:
        response.force_close()


def server_kwargs(config: Config) -> dict[str, Any]:
    """The listener's limits, for `web.run_app(**...)`, `web.AppRunner(app, **...)` or `TestServer.start_server`.

    Limits, and the access logger that also feeds the metrics; the caller still passes host/port or sock
    and `shutdown_timeout`.
    """
    server = config.server
    return {
        "access_log_class": StructuredAccessLogger,
        # aiohttp >= 3.14 arms this timer when the connection opens and again after each response, and
        # incoming bytes do not extend it; so it is also the deadline for a complete request head, which
        # is what cuts slowloris clients (RELIABILITY.md §0.4 describes 3.13, which armed it only after a
        # response). tests/test_hostile.py sends a header a byte at a time to prove it.
        "keepalive_timeout": server.keepalive_timeout,
        # A refused body is drained for at most this long (aiohttp's default is 10 s per connection).
        "lingering_time": server.lingering_time,
        "max_line_size": server.max_line_size,
        "max_field_size": server.max_field_size,
        "max_headers": server.max_headers,
    }


def create_app(config: Config, *, clock: Clock = time.time, slab: Slab | None = None, row: int = 0,
               leader: bool = True) -> web.Application:
    """Build the app; no I/O here, everything that opens something lives in a cleanup context.

    `slab` and `row`: the workers' shared counters and this worker's row in them (workers.py, tally.py).
    `leader`: this process runs the once-per-proxy duties (the admin listener, mirror mode; workers.py).
    """
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = config
    app[CLOCK] = clock
    app[TALLY] = Tally((*COUNTER_NAMES, *METRIC_SLOTS), slab, row)
    app[COUNTERS] = Counters(app[TALLY])
    app[LEADER] = leader
    app.cleanup_ctx.extend([_store_ctx, _origin_ctx, _service_ctx, _ops_ctx])  # unwound in reverse
    app.on_response_prepare.append(_close_after_upgrade)
    mount = config.server.mount
    app.router.add_get(mount or "/", serve_object)  # add_get also registers HEAD
    app.router.add_get(mount + "/{tail:.*}", serve_object)  # keys.py reads raw_path, not tail
    add_monitoring_routes(app)
    if not config.admin.port:
        mount_admin(app, config.admin)
    return app

"""The aiohttp application: routes, lifetimes, the GET/HEAD handler and the two body writers."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator
from typing import BinaryIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from .admin import setup_admin
from .conditional import Plan, evaluate
from .config import Config
from .keys import Key, Reject, index_key, redirect_location, request_key
from .models import Clock, ObjectMeta, Outcome
from .origin import ObjectMissing, OriginDenied, OriginError, OriginTimeout, S3Origin, open_origin
from .policy import ttl_for, ttl_left
from .service import CHUNK_SIZE, CachingProxy, FromCache, FromFill, FromHead, Resolved
from .store import CacheStore

__all__ = ["CLOCK", "CONFIG", "ORIGIN", "OUTCOME", "SERVICE", "STORE", "AccessLogger", "create_app"]

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
CLOCK = web.AppKey("clock", Clock)
STORE = web.AppKey("store", CacheStore)
ORIGIN = web.AppKey("origin", S3Origin)
SERVICE = web.AppKey("service", CachingProxy)
OUTCOME = web.RequestKey("outcome", Outcome)

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


def _object_headers(meta: ObjectMeta) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict(meta.headers)
    headers.setdefault("Content-Type", "binary/octet-stream")  # what S3 itself sends without one
    if meta.etag:
        headers["ETag"] = meta.etag
    if meta.last_modified is not None:
        headers["Last-Modified"] = email.utils.formatdate(meta.last_modified, usegmt=True)
    headers["Accept-Ranges"] = "bytes"
    return headers


def _cache_headers(headers: CIMultiDict[str], resolved: Resolved, ttl: float, now: float) -> None:
    """X-Cache, Age (RFC 9111 §4) and Cache-Status (RFC 9211)."""
    headers["X-Cache"] = resolved.outcome.value
    if isinstance(resolved, FromCache):
        left = int(ttl_left(resolved.entry, ttl, now))
        headers["Age"] = str(max(0, int(now - resolved.entry.checked_at)))
        status = {
            Outcome.HIT: f"hit; ttl={left}",
            Outcome.REVALIDATED: f"fwd=stale; fwd-status=304; ttl={left}",
            Outcome.STALE: f"hit; ttl={left}; detail=stale-if-error",
        }[resolved.outcome]
    else:
        headers["Age"] = "0"
        status = "fwd=miss; fwd-status=200"
    headers["Cache-Status"] = f"{CACHE_STATUS}; {status}"


async def serve_object(request: web.Request) -> web.StreamResponse:
    if request.body_exists:
        # RFC 9110 §9.3.1: a GET body has no meaning, and a front proxy may frame it differently (request
        # smuggling, RELIABILITY.md §4). Refuse it and close, so no byte after it is read as a request.
        refusal = web.HTTPBadRequest(text="Bad Request: GET and HEAD take no body\n")
        refusal.force_close()
        raise refusal
    config = request.app[CONFIG]
    s3, cache = config.s3, config.cache
    key = request_key(request.raw_path, mount=config.server.mount, prefix=s3.prefix,
                      index_document=cache.index_document)
    if isinstance(key, Reject):
        raise (web.HTTPBadRequest if key.status == 400 else web.HTTPNotFound)(text=key.reason + "\n")
    service = request.app[SERVICE]
    ttl = ttl_for(key.s3_key[len(s3.prefix):], cache.rules, cache.ttl)
    want_body = request.method == "GET"
    try:
        resolved = await service.resolve(key.s3_key, ttl=ttl, want_body=want_body)
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
        ttl = ttl_for(error_document, config.cache.rules, config.cache.ttl)
        try:
            resolved = await service.resolve(error_key, ttl=ttl, want_body=request.method == "GET")
        except OriginError:
            pass
        else:
            return await _respond(request, resolved, ttl, conditional=False, status=404)
    raise web.HTTPNotFound(text="Not Found\n")


async def _respond(request: web.Request, resolved: Resolved, ttl: float, *, conditional: bool,
                   status: int = 200) -> web.StreamResponse:
    body = resolved.body if isinstance(resolved, FromCache) else None
    try:
        meta = resolved.entry.meta if isinstance(resolved, FromCache) else resolved.meta
        headers = _object_headers(meta)
        _cache_headers(headers, resolved, ttl, request.app[CLOCK]())
        request[OUTCOME] = resolved.outcome
        if conditional:
            plan = evaluate(request.method, request.headers, etag=meta.etag, last_modified=meta.last_modified,
                            size=meta.size)
        else:
            plan = Plan(status=status, start=0, end=meta.size)
        if plan.status in (304, 412, 416):
            return _bodiless(plan, headers)
        resp = web.StreamResponse(status=plan.status if conditional else status, headers=headers)
        resp.content_length = plan.end - plan.start
        if plan.content_range:
            resp.headers["Content-Range"] = plan.content_range
        await resp.prepare(request)
        if request.method == "HEAD":
            pass
        elif isinstance(resolved, FromCache):
            assert body is not None
            if plan.end > plan.start:
                await _send_file(request, resp, body, plan.start, plan.end - plan.start)
        elif isinstance(resolved, FromFill):
            try:
                async for chunk in request.app[SERVICE].read(resolved.fill, plan.start, plan.end):
                    await resp.write(chunk)
            except OriginError:
                # Headers and part of the body are out: the only honest signal left is to cut the
                # connection, so the client sees a short body instead of a complete-looking wrong one.
                _abort(request)
                return resp
        else:
            assert isinstance(resolved, FromHead)
        await resp.write_eof()
        return resp
    finally:
        if body is not None:
            await request.app[STORE].close_body(body)
        if isinstance(resolved, FromFill):
            request.app[SERVICE].release(resolved.fill)


def _bodiless(plan: Plan, headers: CIMultiDict[str]) -> web.Response:
    if plan.status == 304:
        kept: CIMultiDict[str] = CIMultiDict((k, v) for k, v in headers.items() if k in NOT_MODIFIED_HEADERS)
        return web.Response(status=304, headers=kept)
    extra = {"Content-Range": plan.content_range} if plan.content_range else {}
    text = "Range Not Satisfiable\n" if plan.status == 416 else "Precondition Failed\n"
    return web.Response(status=plan.status, text=text, headers=extra)


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _send_file(request: web.Request, resp: web.StreamResponse, body: BinaryIO, offset: int,
                     count: int) -> None:
    """Zero-copy from the cached file under our own validators (aiohttp's FileResponse invents its own)."""
    loop = asyncio.get_running_loop()
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    try:
        await loop.sendfile(transport, body, offset, count)
        return
    except NotImplementedError:
        pass  # TLS transports and some event loops: copy through the executor instead
    store = request.app[STORE]
    end = offset + count
    while offset < end:
        chunk = await store.pread(body.fileno(), min(CHUNK_SIZE, end - offset), offset)
        if not chunk:
            raise ConnectionResetError("cached body shrank while being sent")
        await resp.write(chunk)
        offset += len(chunk)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, bytes, X-Cache, duration."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d %d %s %.1fms",
            request.method,
            request.path,
            response.status,
            response.body_length,
            response.headers.get("X-Cache", "-"),
            time * 1000,
        )


# -- lifetimes ----------------------------------------------------------------------------------------


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cache = app[CONFIG].cache
    store = CacheStore(cache.directory, cache.size_limit_mb * 1024 * 1024, verify_on_read=cache.verify_on_read)
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _origin_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_origin(app[CONFIG].s3) as origin:
        app[ORIGIN] = origin
        yield


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    service = CachingProxy(app[CONFIG], app[STORE], app[ORIGIN], app[CLOCK])
    app[SERVICE] = service
    yield
    await service.close(grace=app[CONFIG].server.shutdown_timeout)


def create_app(config: Config, *, clock: Clock = time.time) -> web.Application:
    """Build the app; no I/O here, everything that opens something lives in a cleanup context."""
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = config
    app[CLOCK] = clock
    app.cleanup_ctx.extend([_store_ctx, _origin_ctx, _service_ctx])  # unwound in reverse
    mount = config.server.mount
    app.router.add_get(mount or "/", serve_object)  # add_get also registers HEAD
    app.router.add_get(mount + "/{tail:.*}", serve_object)  # keys.py reads raw_path, not tail
    setup_admin(app)  # /metrics, /healthz, /readyz, the admin API and the access log's measurements
    return app

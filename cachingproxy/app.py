"""The aiohttp application: routes, lifetimes, the GET/HEAD handler and the two body writers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web, web_response
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from .accesslog import StructuredAccessLogger, request_id, track_s3_calls
from .admin import mount_admin, start_admin_listener
from .appkeys import BODY_SENT, CLOCK, CONFIG, COUNTERS, EVENTS_HEALTH, SITE, SITES, STARTED, STORE, TALLY
from .conditional import Plan, evaluate
from .config import Config, S3Config
from .counters import SITE as SITE_NAME
from .counters import Counters, cell_names
from .events import HEALTH_CELL, EventConsumer, EventHealth
from .fill import FileSpan
from .freshness import (
    REDIRECT_CACHE_CONTROL,
    UNVALIDATED_CACHE_CONTROL,
    ClientFreshness,
    age,
    client_freshness,
    not_found_headers,
    redirect_cache_control,
)
from .headers import CACHE_STATUS, NOT_MODIFIED_HEADERS
from .hitpath import memo_headers, memo_request_key, reset, send_file
from .keys import Key, Redirect, Reject, index_key, redirect_location
from .metrics import slots as metric_slots
from .models import Clock, ObjectMeta
from .monitoring import OPS, Ops, add_monitoring_routes
from .namespace import NamespacedStore, namespace_for
from .origin import (
    BucketMissing,
    ObjectMissing,
    OriginDenied,
    OriginError,
    OriginTimeout,
    S3Origin,
    client_settings,
    open_client,
)
from .policy import Breaker, ttl_left, windows_for
from .queue import open_queue
from .requestforms import quiet_parse_errors, request_forms
from .s3state import EveryMinute, endpoint
from .service import CachingProxy, FromCache, FromFill, FromHead, Resolved
from .sites import Listing, Site, Sites
from .store import CacheStore
from .tally import Slab, Tally
from .website import listing_page, redirect_target

__all__ = ["create_app", "server_kwargs"]

log = logging.getLogger(__name__)

LEADER = web.AppKey("leader", bool)
CHECK_BUCKET = web.AppKey("check_bucket", bool)
SERVER = "cachingproxy"
_BUCKET_MISSING_LOG = EveryMinute()
# Every response's Server header, aiohttp's own 400s for malformed requests included (no app hook sees those):
# aiohttp names itself and Python with their versions, which tells a scanner what to try. web_response reads
# this module global for each response (aiohttp 3.14; pinned below 3.15), tests/test_readme.py checks it.
setattr(web_response, "SERVER_SOFTWARE", SERVER)  # noqa: B010 (not exported: mypy)
_OUTCOME_HEADERS = ("X-Cache", "Age", "Cache-Status")  # on every response that comes from an object
EVENTS = web.AppKey("events", EventConsumer)  # the leader's, with [events] queue_url


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error boundary: short plain-text statuses, never a traceback or anything S3 said."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        # aiohttp writes "GET,HEAD"; RFC 9110 §10.2.1's list style (and the README) has a space.
        exc.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        raise
    except web.HTTPException:
        raise
    except ObjectMissing:
        raise web.HTTPNotFound(text="Not Found\n") from None
    except BucketMissing:
        # Not a missing key (nothing is negative-cached), but every request would say so: once a minute.
        site = request.get(SITE)
        if site is not None and _BUCKET_MISSING_LOG.due(time.monotonic()):
            s3 = site.config.s3
            log.error('404: bucket "%s" does not exist at %s (logged once a minute)', s3.bucket, endpoint(s3))
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


async def serve_object(request: web.Request) -> web.StreamResponse:
    request[STARTED] = time.perf_counter()
    if request.body_exists:
        # RFC 9110 §9.3.1: a GET body has no meaning, and a front proxy may frame it differently (request
        # smuggling, docs/reliability.md §4). Refuse it and close, so no byte after it is read as a request.
        refusal = web.HTTPBadRequest(text="Bad Request: GET and HEAD take no body\n")
        refusal.force_close()
        raise refusal
    site = request.app[SITES].route(request.host, request.raw_path)
    if site is None:
        request.app[COUNTERS].add("unrouted")
        raise web.HTTPNotFound(text="Not Found: no site is served here\n")
    request[SITE] = site
    SITE_NAME.set(site.name)  # counts made for this request (and the fills it starts) are the site's
    config = site.config
    key = memo_request_key(request.raw_path, config.mount, config.s3.prefix, config.cache.index_document)
    if isinstance(key, Redirect):
        raise web.HTTPMovedPermanently(location=key.location,
                                       headers={"Cache-Control": redirect_cache_control("", config.cache.rules)})
    if isinstance(key, Reject):
        raise (web.HTTPBadRequest if key.status == 400 else web.HTTPNotFound)(text=key.reason + "\n")
    service = site.service
    relative = key.s3_key[len(config.s3.prefix):]
    windows = windows_for(relative, config.cache, _ttl_cap(request.app))
    ttl = windows.ttl
    client = client_freshness(relative, config.cache.rules, config.cache.client_cache_control)
    want_body = request.method == "GET"
    if want_body:
        hit = service.hit_in_memory(key.s3_key, ttl=ttl)
        if hit is not None and not hit.entry.meta.redirect:
            # Most requests end here: nothing awaited, no S3 request possible, one write.
            return _from_memory(request, hit, ttl, client, conditional=True, status=200)
    track_s3_calls(request)
    try:
        resolved = await service.resolve(key.s3_key, windows=windows, want_body=want_body)
    except OriginDenied as exc:
        # A GET's AccessDenied is what S3 says for a missing key to a reader without s3:ListBucket; a
        # body-less HEAD 403 on a cold key is read the same way so HEAD and GET agree.
        if want_body and not exc.proves_absence:
            raise
        return await _not_found(request, site, key)
    except ObjectMissing:
        return await _not_found(request, site, key)
    return await _respond(request, resolved, ttl, client, conditional=True)


def _ttl_cap(app: web.Application) -> float | None:
    """[events] fallback_ttl while the events consumer is not reading its queue (any worker can tell)."""
    health = app.get(EVENTS_HEALTH)
    return None if health is None or health.ok else app[CONFIG].events.fallback_ttl


async def _not_found(request: web.Request, site: Site, key: Key) -> web.StreamResponse:
    config = site.config
    service = site.service
    if not key.directory and await service.exists(index_key(key, config.cache.index_document)):
        # S3 website behaviour: `dir` -> `dir/` so that relative links in dir/index.html resolve.
        control = redirect_cache_control(key.s3_key[len(config.s3.prefix):], config.cache.rules)
        raise web.HTTPMovedPermanently(location=redirect_location(key, mount=config.mount),
                                       headers={"Cache-Control": control})
    if key.directory and config.listing:
        page = await _listing(request, site, key.s3_key[: -len(config.cache.index_document)])
        if page is not None:
            return page
    error_document = config.cache.error_document
    negative_ttl = config.cache.negative_ttl
    if error_document:
        error_key = config.s3.prefix + error_document
        windows = windows_for(error_document, config.cache, _ttl_cap(request.app))
        try:
            resolved = await service.resolve(error_key, windows=windows, want_body=request.method == "GET")
        except OriginError:
            pass
        else:
            # A 404 is a 404 (freshness.not_found_headers): sent whole, under none of the error document's
            # validators, so If-None-Match, If-Modified-Since and Range never apply to it.
            meta = resolved.entry.meta if isinstance(resolved, FromCache) else resolved.meta
            headers = CIMultiDictProxy(CIMultiDict(not_found_headers(meta.headers, negative_ttl, CACHE_STATUS)))
            return await _respond(request, resolved, windows.ttl, None, conditional=False, status=404,
                                  headers=headers)
    raise web.HTTPNotFound(text="Not Found\n", headers=not_found_headers((), negative_ttl, CACHE_STATUS))


LISTINGS_KEPT = 256  # folder listings remembered per site and worker


async def _listing(request: web.Request, site: Site, folder: str) -> web.Response | None:
    """A folder's listing page (`listing = true`), remembered for the site's TTL; None when the folder is empty."""
    now = request.app[CLOCK]()
    kept = site.listings.get(folder)
    outcome = "HIT"
    if kept is None or not 0 <= now - kept.made_at < site.config.cache.ttl:
        outcome = "MISS"
        found = await site.origin.list_folder(folder)
        if not found.folders and not found.objects:
            return None
        names = [p[len(folder):] for p in found.folders]
        objects = [(o.key[len(folder):], o.size, o.last_modified) for o in found.objects if o.key != folder]
        title = site.config.mount + "/" + folder[len(site.config.s3.prefix):]
        kept = site.listings[folder] = Listing(listing_page(title, names, objects, found.truncated), now)
        while len(site.listings) > LISTINGS_KEPT:
            site.listings.pop(next(iter(site.listings)))
    return web.Response(body=kept.body if request.method == "GET" else None, content_type="text/html",
                        charset="utf-8", headers={"Cache-Control": UNVALIDATED_CACHE_CONTROL, "X-Cache": outcome})


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


def _from_memory(request: web.Request, resolved: FromCache, ttl: float, client: ClientFreshness | None, *,
                 conditional: bool, status: int, headers: CIMultiDictProxy[str] | None = None) -> web.Response:
    """A GET of a small body held in memory: a Response sends head and body in one write (one syscall, one
    segment); a StreamResponse sends its head alone at prepare(), which doubled a hit's send cost."""
    body = resolved.body
    assert isinstance(body, bytes)
    meta = resolved.entry.meta
    if headers is None:
        assert client is not None
        headers = response_headers(resolved, ttl, client, request.app[CLOCK]())
    plan = _plan(request, meta, conditional=conditional, status=status)
    if plan.status in (304, 412, 416):
        return _bodiless(plan, headers)
    if plan.end - plan.start != len(body):
        body = body[plan.start : plan.end]
    request[BODY_SENT] = len(body)
    return web.Response(status=plan.status, headers=_with(headers, plan), body=body)


async def _respond(request: web.Request, resolved: Resolved, ttl: float, client: ClientFreshness | None, *,
                   conditional: bool, status: int = 200,
                   headers: CIMultiDictProxy[str] | None = None) -> web.StreamResponse:
    """`headers`: sent instead of the object's own (a 404 with the error document); else `client` is needed."""
    meta = resolved.entry.meta if isinstance(resolved, FromCache) else resolved.meta
    location = _website_redirect(request, meta.redirect) if meta.redirect else None
    if location is not None:
        await _release(request, resolved)
        control = client.redirect if client is not None else REDIRECT_CACHE_CONTROL
        raise web.HTTPMovedPermanently(location=location, headers={"Cache-Control": control})
    if isinstance(resolved, FromCache) and isinstance(resolved.body, bytes) and request.method == "GET":
        return _from_memory(request, resolved, ttl, client, conditional=conditional, status=status, headers=headers)
    body = resolved.body if isinstance(resolved, FromCache) else None
    try:
        if headers is None:
            assert client is not None
            headers = response_headers(resolved, ttl, client, request.app[CLOCK]())
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
        except OriginError:
            # Headers and part of the body are out: the only honest signal left is to cut the
            # connection, so the client sees a short body instead of a complete-looking wrong one.
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
        kept: CIMultiDict[str] = CIMultiDict((k, v) for k, v in headers.items() if k in NOT_MODIFIED_HEADERS)
        return web.Response(status=304, headers=kept)
    # The object was looked up, so the outcome applies here too.
    extra = {name: headers[name] for name in _OUTCOME_HEADERS}
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


# -- lifetimes ----------------------------------------------------------------------------------------


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    cache = app[CONFIG].cache
    store = CacheStore(cache.directory, cache.size_limit_mb * 1024 * 1024, verify_on_read=cache.verify_on_read,
                       count=app[TALLY].add)
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _sites_ctx(app: web.Application) -> AsyncIterator[None]:
    """Each site's S3 origin and service. Sites whose S3 settings match share one client (and its connection
    pool and breaker); each site gets its own view of the one cache, namespaced by endpoint and bucket."""
    config, counters = app[CONFIG], app[COUNTERS]
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[S3Config, tuple[Any, Breaker]] = {}
        sites: dict[str, Site] = {}
        for site in config.sites:
            settings = client_settings(site.s3)
            if settings not in clients:
                client = await stack.enter_async_context(open_client(site.s3, counters))
                clients[settings] = (client, Breaker(site.s3.breaker_threshold, site.s3.breaker_cooldown))
            client, breaker = clients[settings]
            origin = S3Origin(client, site.s3, counters)
            store = NamespacedStore(app[STORE], namespace_for(site.s3))
            service = CachingProxy(site.cache, store, origin, app[CLOCK], counters, breaker)
            sites[site.name] = Site(site, service, origin, store)
        app[SITES] = Sites(sites)
        try:
            yield
        finally:
            grace = config.server.shutdown_timeout
            await asyncio.gather(*(site.service.close(grace=grace) for site in sites.values()))


def response_headers(resolved: Resolved, ttl: float, client: ClientFreshness, now: float) -> CIMultiDictProxy[str]:
    """The object's headers plus X-Cache, the stored Date with Age (RFC 9111 §4.2.3, freshness.py) and
    Cache-Status (RFC 9211); read-only, since they are shared: a Response copies them, anyone adding a
    header copies first. A miss gets Age 0 and aiohttp's Date (now)."""
    if isinstance(resolved, FromCache):
        entry = resolved.entry
        return memo_headers(entry.meta, resolved.outcome, age(entry.checked_at, now), int(ttl_left(entry, ttl, now)),
                            int(entry.checked_at), client)
    return memo_headers(resolved.meta, resolved.outcome, 0, None, None, client)


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    """The S3 events consumer, in the leader only (one per proxy): a sweep at start, then the queue loop."""
    config = app[CONFIG]
    health = app.get(EVENTS_HEALTH)
    if not app[LEADER] or health is None:
        yield
        return
    async with open_queue(config.events, config.sites[0].s3.region) as queue:
        consumer = app[EVENTS] = EventConsumer(queue, app[SITES], config.events, app[CLOCK], app[COUNTERS],
                                               app[TALLY], health)
        await consumer.start()
        try:
            yield
        finally:
            await consumer.close()
            health.lost()


async def _ops_ctx(app: web.Application) -> AsyncIterator[None]:
    """Monitoring and the admin API; with several workers only the leader (`leader=True`, see workers.py)
    opens the admin listener and runs mirror mode."""
    config = app[CONFIG]
    ops = app[OPS] = Ops(config, app[CLOCK], app[STORE], app[SITES], app[COUNTERS], app[TALLY])
    leader = app[LEADER]
    runner: web.AppRunner | None = None
    # One check of the bucket per proxy, in the background: a problem is logged, and starting goes on.
    report = asyncio.create_task(ops.report_buckets()) if app[CHECK_BUCKET] else None
    try:
        runner = await start_admin_listener(config, ops, leader=leader)
        for site in config.sites if leader else ():
            if site.warm_prefixes:
                ops.warmers[site.name].start_mirror(site.warm_prefixes, config.admin.warm_interval)
        yield
    finally:
        if report is not None:
            report.cancel()
        await ops.close()
        if runner is not None:
            await runner.cleanup()


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Last touches before any response head leaves: the site's own headers, and the Upgrade guard."""
    site = request.get(SITE)
    if site is not None and site.config.headers:
        response.headers.update(site.config.headers)  # [sites.headers] replace what S3 said
    # We never switch protocols (RFC 9110 §7.8 lets a server ignore Upgrade), but a front proxy that does not
    # check for 101 may now treat the connection as a raw tunnel: close it, so nothing sent after this request
    # is ever read as a new one (websocket/h2c smuggling).
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
        "access_log_format": server.access_log,  # our logger's format name, not aiohttp's %-format
        # aiohttp >= 3.14 arms this timer when the connection opens and again after each response, and
        # incoming bytes do not extend it; so it is also the deadline for a complete request head, which
        # is what cuts slowloris clients (docs/reliability.md §0.4 describes 3.13, which armed it only after a
        # response). tests/test_hostile.py sends a header a byte at a time to prove it.
        "keepalive_timeout": server.keepalive_timeout,
        # A refused body is drained for at most this long (aiohttp's default is 10 s per connection).
        "lingering_time": server.lingering_time,
        "max_line_size": server.max_line_size,
        "max_field_size": server.max_field_size,
        "max_headers": server.max_headers,
    }


def create_app(config: Config, *, clock: Clock = time.time, slab: Slab | None = None, row: int = 0,
               leader: bool = True, check_bucket: bool = False) -> web.Application:
    """Build the app; no I/O here, everything that opens something lives in a cleanup context.

    `slab` and `row`: the workers' shared counters and this worker's row in them (workers.py, tally.py).
    `leader`: this process runs the once-per-proxy duties (the admin listener, mirror mode; workers.py).
    `check_bucket`: check the bucket once at start and log what is wrong (`cachingproxy serve`'s leader).
    """
    quiet_parse_errors()  # aiohttp's own 400s never echo request bytes (requestforms.py)
    app = web.Application(middlewares=[request_forms, error_middleware])
    app[CONFIG] = config
    app[CLOCK] = clock
    names = tuple(site.name for site in config.sites)
    app[TALLY] = Tally((*cell_names(names), *metric_slots(names), HEALTH_CELL), slab, row)
    app[COUNTERS] = Counters(app[TALLY], names)
    app[LEADER] = leader
    app[CHECK_BUCKET] = check_bucket
    if config.events.enabled:
        # The lease outlives one long poll and its timeout (queue.py), so a healthy consumer never lapses.
        app[EVENTS_HEALTH] = EventHealth(app[TALLY], lease=config.events.wait_seconds + 45.0)
    app.cleanup_ctx.extend([_store_ctx, _sites_ctx, _events_ctx, _ops_ctx])  # unwound in reverse
    app.on_response_prepare.append(_on_prepare)
    app.on_response_prepare.append(request_id)
    # Registered first, so they win over a site mounted at "/".
    add_monitoring_routes(app, public_metrics=config.admin.public_metrics)
    if not config.admin.port:
        mount_admin(app, config.admin)
    # Every other path: the sites route by Host and mount themselves (routing.py); keys.py reads raw_path.
    app.router.add_get("/{tail:.*}", serve_object)  # add_get also registers HEAD
    return app

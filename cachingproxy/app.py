"""The composition root: the aiohttp application, its routes and lifetimes, and the GET/HEAD handler that
routes a request to its site and asks the site's service for an answer (respond.py writes it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web, web_response
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from .access import SiteAccess, load_access
from .access_rules import parse_networks, private_cache_control
from .accesslog import StructuredAccessLogger, request_id, track_s3_calls
from .admin import mount_admin, start_admin_listener
from .appkeys import (
    CLIENT,
    CLOCK,
    CONFIG,
    COUNTERS,
    EVENTS_HEALTH,
    OBJECT_KEY,
    SITE,
    SITES,
    STARTED,
    STORE,
    TALLY,
)
from .config import Config, S3Config
from .counters import SITE as SITE_NAME
from .counters import Counters, cell_names
from .events import HEALTH_CELL, EventConsumer, EventHealth
from .fasthit import enable_fast_hits, install
from .forwarded import forwarded_middleware
from .freshness import (
    UNVALIDATED_CACHE_CONTROL,
    client_freshness,
    not_found_headers,
    redirect_cache_control,
)
from .headers import CACHE_STATUS, SERVER
from .hitpath import memo_request_key
from .keys import Key, Redirect, Reject, index_key, redirect_location
from .metrics import slots as metric_slots
from .models import Clock
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
from .policy import Breaker, windows_for
from .queue import open_queue
from .redirect import start_redirect_listener
from .requestforms import quiet_parse_errors, request_forms
from .respond import from_memory, respond
from .s3state import EveryMinute, endpoint
from .service import CachingProxy, FromCache
from .sites import Listing, Site, Sites
from .store import CacheStore
from .tally import Slab, Tally
from .variants import Variants
from .website import listing_page

__all__ = ["create_app", "server_kwargs"]

log = logging.getLogger(__name__)

LEADER = web.AppKey("leader", bool)
CHECK_BUCKET = web.AppKey("check_bucket", bool)
_BUCKET_MISSING_LOG = EveryMinute()
# Every response's Server header, aiohttp's own 400s for malformed requests included (no app hook sees those):
# aiohttp names itself and Python with their versions, which tells a scanner what to try. web_response reads
# this module global for each response (aiohttp 3.14; pinned below 3.15), tests/test_readme.py checks it.
setattr(web_response, "SERVER_SOFTWARE", SERVER)  # noqa: B010 (not exported: mypy)
EVENTS = web.AppKey("events", EventConsumer)  # the leader's, with [events] queue_url


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One error boundary: short plain-text statuses, never a traceback or anything S3 said."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        # A protected site answers 401/403 to every method before it says which methods exist.
        site = request.app[SITES].route(request.host, request.raw_path) if SITES in request.app else None
        if site is not None and site.access is not None:
            request[SITE] = site
            await _guard(request, site.access)
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
    if site.access is not None:  # before the cache, redirects and 404s: they would tell what exists
        await _guard(request, site.access)
    SITE_NAME.set(site.name)  # counts made for this request (and the fills it starts) are the site's
    config = site.config
    key = memo_request_key(request.raw_path, config.mount, config.s3.prefix, config.cache.index_document)
    if isinstance(key, Redirect):
        raise web.HTTPMovedPermanently(location=key.location,
                                       headers={"Cache-Control": redirect_cache_control("", config.cache.rules)})
    if isinstance(key, Reject):
        raise (web.HTTPBadRequest if key.status == 400 else web.HTTPNotFound)(text=key.reason + "\n")
    request[OBJECT_KEY] = key.s3_key
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
            answer = from_memory(request, hit, ttl, client, conditional=True, status=200)
            # None: a gzip-stored body to decompress for this client, which respond() streams.
            return answer if answer is not None else await respond(request, hit, ttl, client, conditional=True)
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
    return await respond(request, resolved, ttl, client, conditional=True)


def _ttl_cap(app: web.Application) -> float | None:
    """[events] fallback_ttl while the events consumer is not reading its queue (any worker can tell)."""
    health = app.get(EVENTS_HEALTH)
    return None if health is None or health.ok else app[CONFIG].events.fallback_ttl


async def _guard(request: web.Request, access: SiteAccess) -> None:
    """[sites.access]: 403 for an address outside `allow`, 401 asking for Basic credentials (RFC 7617)."""
    client = request.get(CLIENT) or request.remote or ""
    refusal = await access.refusal(client, request.headers.get("Authorization"))
    if refusal is None:
        return
    if refusal.status == 403:
        raise web.HTTPForbidden(text="Forbidden\n")
    raise web.HTTPUnauthorized(text="Unauthorized\n", headers={
        "WWW-Authenticate": f'Basic realm="{refusal.realm}", charset="UTF-8"'})


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
            return await respond(request, resolved, windows.ttl, None, conditional=False, status=404,
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
    # One thread per worker compresses variants, so making them never takes more than one core from serving.
    compressing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(compressing.shutdown, wait=False, cancel_futures=True)
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
            variants = Variants(store, config.compression, compressing)
            sites[site.name] = Site(site, service, origin, store, variants, access=load_access(site))
        app[SITES] = Sites(sites)
        try:
            yield
        finally:
            grace = config.server.shutdown_timeout
            await asyncio.gather(*(site.service.close(grace=grace) for site in sites.values()),
                                 *(site.variants.close() for site in sites.values()))


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
    """Monitoring and the admin API; with several workers only the leader (`leader=True`, see worker.py)
    opens the admin listener and runs mirror mode."""
    config = app[CONFIG]
    ops = app[OPS] = Ops(config, app[CLOCK], app[STORE], app[SITES], app[COUNTERS], app[TALLY])
    leader = app[LEADER]
    runner: web.AppRunner | None = None
    redirect: web.AppRunner | None = None
    # One check of the bucket per proxy, in the background: a problem is logged, and starting goes on.
    report = asyncio.create_task(ops.report_buckets()) if app[CHECK_BUCKET] else None
    try:
        runner = await start_admin_listener(config, ops, leader=leader)
        redirect = await start_redirect_listener(config) if leader else None
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
        if redirect is not None:
            await redirect.cleanup()


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Last touches before any response head leaves: the site's own headers, and the Upgrade guard."""
    site = request.get(SITE)
    if site is not None and site.config.headers:
        response.headers.update(site.config.headers)  # [sites.headers] replace what S3 said
    if site is not None and site.access is not None:
        # Behind a password or an address list: no shared cache between us and the reader may keep it.
        response.headers["Cache-Control"] = private_cache_control(response.headers.get("Cache-Control"))
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

    `slab` and `row`: the workers' shared counters and this worker's row in them (generation.py, tally.py).
    `leader`: this process runs the once-per-proxy duties (the admin listener, mirror mode; worker.py).
    `check_bucket`: check the bucket once at start and log what is wrong (`cachingproxy serve`'s leader).
    """
    quiet_parse_errors()  # aiohttp's own 400s never echo request bytes (requestforms.py)
    install()  # connections of apps with fast hits answer them below the web layer (fasthit.py)
    # The forwarded-header middleware only behind a trusted load balancer: others pay nothing for it.
    front = [forwarded_middleware(parse_networks(config.server.trusted_proxies))] if config.server.trusted_proxies \
        else []
    app = web.Application(middlewares=[*front, request_forms, error_middleware])
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
    app.on_startup.append(enable_fast_hits)  # after the cleanup contexts: it needs what they opened
    app.on_response_prepare.append(_on_prepare)
    app.on_response_prepare.append(request_id)
    # Registered first, so they win over a site mounted at "/".
    add_monitoring_routes(app, public_metrics=config.admin.public_metrics)
    if not config.admin.port:
        mount_admin(app, config.admin)
    # Every other path: the sites route by Host and mount themselves (routing.py); keys.py reads raw_path.
    app.router.add_get("/{tail:.*}", serve_object)  # add_get also registers HEAD
    return app

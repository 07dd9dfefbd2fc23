"""Operations: the admin API (warm, purge, stats, dashboard), /metrics, /healthz, /readyz and the access log.

The admin API is a sub-app under `[admin] path` on the proxy's listener, or its own listener on
`[admin] host:port`, and is off (404) without a token. Every admin route except the dashboard page needs
`Authorization: Bearer <token>`. The page itself holds no data and fetches it from JS with that header, so a
cross-site form post, or a page on a rebinding DNS name, cannot act through an operator's browser
(RELIABILITY.md §4, admin exposure). /metrics, /healthz and /readyz sit at the root, outside the token.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from functools import cache
from importlib.resources import files
from pathlib import Path
from time import perf_counter
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from .config import ADMIN_TOKEN_ENV, AdminConfig, Config
from .metrics import CONTENT_TYPE, Metrics, Snapshot
from .models import Clock
from .origin import OriginDenied, OriginError, S3Origin
from .service import S3_CALLS as CURRENT_S3_CALLS
from .service import CachingProxy, Counters
from .store import WRITE_ERRORS, CacheStore
from .tally import Tally
from .warm import JobBoard, Warmer

__all__ = [
    "ADMIN_MAX_BODY",
    "BODY_SENT",
    "OPS",
    "S3_CALLS",
    "STARTED",
    "Ops",
    "StructuredAccessLogger",
    "readiness",
    "setup_admin",
    "track_s3_calls",
]

log = logging.getLogger(__name__)

ADMIN_MAX_BODY = 64 * 1024  # admin bodies are tiny JSON; aiohttp's default is 1 MiB (RELIABILITY.md §4)
READY_PROBE_TIMEOUT = 2.0  # /readyz answers within this even when S3 accepts connections and never replies
MAX_KEY = 1024  # S3's own key length limit, for keys and prefixes sent to the admin API
JSON_TYPE = "application/json"
DASHBOARD = "dashboard"  # route name: the one admin route that needs no token
LEADER_LOCK = "admin.lock"  # in [cache] directory; see _lead
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
NO_STORE = {"Cache-Control": "no-store"}
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

S3_CALLS = web.RequestKey("s3_calls", collections.Counter)  # S3 requests made for this request, by operation
BODY_SENT = web.RequestKey("body_sent", int)  # object body bytes an object response delivered in full
# time.perf_counter() when the object handler began. aiohttp's own request time comes from loop.time(),
# which under uvloop moves in whole milliseconds: a 0.3 ms hit would be logged and binned as 0 or 1 ms.
STARTED = web.RequestKey("started", float)


def readiness(cache_ok: bool, s3_ok: bool) -> tuple[int, str]:
    """/readyz: "ready" when both work; "degraded" but still 200 when one does (the mirror is serving); else 503."""
    if cache_ok and s3_ok:
        return 200, "ready"
    if cache_ok or s3_ok:
        return 200, "degraded"
    return 503, "unavailable"


class Ops:
    """What the operations routes share: the warmer, the metrics and the cached S3 reachability check."""

    def __init__(self, config: Config, clock: Clock, store: CacheStore, origin: S3Origin,
                 service: CachingProxy, tally: Tally) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.origin = origin
        self.service = service
        self.metrics = Metrics(tally)
        self._tally = tally
        self.warmer = Warmer(service, store, origin, clock, s3_prefix=config.s3.prefix,
                             concurrency=config.admin.warm_concurrency,
                             board=JobBoard(Path(config.cache.directory) / "warm-jobs"))
        self.started = clock()
        self._s3_state: tuple[float, bool] | None = None  # (checked at, reachable)
        self._probe: asyncio.Task[bool] | None = None

    async def s3_reachable(self) -> bool:
        """One 1-key ListObjectsV2 per `readiness_ttl`, shared by concurrent callers."""
        state = self._s3_state
        if state is not None and self.clock() - state[0] < self.config.admin.readiness_ttl:
            return state[1]
        if self._probe is None:
            probe = self._probe = asyncio.create_task(self._check_s3())
            probe.add_done_callback(lambda _: setattr(self, "_probe", None))
        return await asyncio.shield(self._probe)

    async def snapshot(self) -> Snapshot:
        rows, volume = await self.store.stats()
        totals = self._tally.totals()  # every worker's counts, not only this one's (tally.py)
        return Snapshot(
            **{name: totals[name] for name in Counters.FIELDS},
            cache_write_errors=totals[WRITE_ERRORS[0]], cache_available=self.store.available,
            # One metadata row and one body row per object. An exact count would read every key (14 s for 100k
            # objects), which a dashboard refresh cannot afford.
            entries=rows // 2,
            bytes_on_disk=volume, size_limit=self.config.cache.size_limit_mb * 1024 * 1024,
            uptime=max(0.0, self.clock() - self.started), warm_jobs_running=self.warmer.running,
            responses=self.metrics.responses,
        )

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.warmer.close()

    async def _check_s3(self) -> bool:
        self.service.counters.s3_list += 1
        try:
            async with asyncio.timeout(READY_PROBE_TIMEOUT):
                await self.origin.list_page(self.config.s3.prefix, max_keys=1)
            ok = True
        except OriginDenied as exc:
            # AccessDenied on a list is a read-only role without s3:ListBucket: S3 answered, and GETs may well
            # work. An expired token or a bad signature is an outage for the proxy too.
            ok = exc.proves_absence
        except (OriginError, TimeoutError):
            ok = False
        self._s3_state = (self.clock(), ok)
        return ok


OPS = web.AppKey("ops", Ops)


# -- the proxy's root: monitoring, measurement and lifetime ------------------------------------------------


def setup_admin(app: web.Application) -> None:
    """Add monitoring routes, the admin API and their lifetime to the proxy app."""
    from .app import CONFIG  # app.py calls this function, so importing app.py at module level would be a cycle

    admin = app[CONFIG].admin
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    if not admin.port:
        _mount(app, admin)
    app.cleanup_ctx.append(_ops_ctx)


async def _ops_ctx(app: web.Application) -> AsyncIterator[None]:
    from .app import CLOCK, CONFIG, ORIGIN, SERVICE, STORE, TALLY  # see setup_admin

    config = app[CONFIG]
    ops = app[OPS] = Ops(config, app[CLOCK], app[STORE], app[ORIGIN], app[SERVICE], app[TALLY])
    lead = _lead(config.cache.directory)
    runner: web.AppRunner | None = None
    try:
        runner = await _start_admin(config, ops, leader=lead is not None)
        if config.admin.warm_prefixes and lead is not None:
            ops.warmer.start_mirror(config.admin.warm_prefixes, config.admin.warm_interval)
        yield
    finally:
        await ops.close()
        if runner is not None:
            await runner.cleanup()
        if lead is not None and lead >= 0:
            os.close(lead)  # releases the lock; a restarted worker takes it over


async def _start_admin(config: Config, ops: Ops, *, leader: bool) -> web.AppRunner | None:
    """Say where the admin API is; start its own listener when it has one (and this process leads)."""
    admin = config.admin
    if not admin.token:
        log.info("admin API off: set %s (or [admin] token) to turn it on", ADMIN_TOKEN_ENV)
        return None
    if admin.port and not leader:
        log.info("admin API on port %d is served by another worker", admin.port)
        return None
    if admin.port:
        root = web.Application(client_max_size=ADMIN_MAX_BODY)
        root[OPS] = ops
        _mount(root, admin)
        runner = web.AppRunner(root, handle_signals=False, access_log_class=StructuredAccessLogger)
        await runner.setup()
        try:
            await web.TCPSite(runner, admin.host, admin.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        log.info("admin API on http://%s:%d%s/", admin.host, admin.port, admin.path)
        return runner
    log.info("admin API on the proxy's port under %s/", admin.path)
    if config.server.host not in LOOPBACK:
        log.warning("the admin API is reachable wherever the proxy is; consider [admin] port on 127.0.0.1")
    return None


def _lead(directory: str) -> int | None:
    """Claim the duties that must run once per cache, not once per worker: the admin listener and mirror mode.

    With [server] workers > 1 every worker builds this app on the same cache directory. The first to flock
    LEADER_LOCK keeps its descriptor open for its lifetime; the kernel drops the lock if it dies, and the
    worker that replaces it takes the lock again. Returns the descriptor, -1 when there is no directory to
    coordinate through (acting alone), or None when another process holds the lock.
    """
    try:
        fd = os.open(os.path.join(directory, LEADER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def track_s3_calls(request: web.Request) -> None:
    """Attribute the S3 requests made from here on (in this request's task and the tasks it spawns) to it."""
    calls: collections.Counter[str] = collections.Counter()
    request[S3_CALLS] = calls
    CURRENT_S3_CALLS.set(calls)  # each request runs in its own task, so this ends with the request


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=NO_STORE)


async def _readyz(request: web.Request) -> web.Response:
    ops = request.app[OPS]
    cache_ok = ops.store.available
    s3_ok = await ops.s3_reachable()
    status, word = readiness(cache_ok, s3_ok)
    body = {"status": word, "cache": "ok" if cache_ok else "unavailable", "s3": "ok" if s3_ok else "unreachable"}
    return web.json_response(body, status=status, headers=NO_STORE)


async def _metrics(request: web.Request) -> web.Response:
    ops = request.app[OPS]
    body = ops.metrics.render(await ops.snapshot())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, **NO_STORE})


class StructuredAccessLogger(AbstractAccessLogger):
    """After each response is sent: its latency by X-Cache and the object bytes it delivered go to the
    metrics, and one JSON line (method, path, status, bytes, cache, ms, s3: the S3 requests it caused) to
    the log. Latency runs to the end of the send, from the object handler's STARTED stamp (or, for other
    routes, from aiohttp's own start, which has millisecond resolution under uvloop).

    So every listener that serves the proxy must use this class (`app.server_kwargs` passes it). The path
    is logged without its query string and no header is logged, so neither can leak a token.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        started = request.get(STARTED)
        if started is not None:
            time = perf_counter() - started
        outcome = response.headers.get("X-Cache")
        delivered = request.get(BODY_SENT)
        try:
            ops = request.config_dict.get(OPS) if isinstance(request, web.Request) else None
        except (AssertionError, AttributeError):  # refused by aiohttp before routing: no app to count in
            ops = None
        if ops is not None:
            ops.metrics.observe(outcome, time)
            if delivered:
                ops.service.counters.add("bytes_served", delivered)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if delivered is None:  # not an object response: whatever body it had in full, none for HEAD
            delivered = (response.content_length or 0) if isinstance(response, web.Response) and \
                request.method != "HEAD" else 0
        calls = request.get(S3_CALLS)
        path = request.raw_path.partition("?")[0].partition("#")[0]
        # Formatted by hand: json.dumps of the whole dict cost more than the rest of a cached hit's logging.
        self.logger.info(
            '{"method":%s,"path":%s,"status":%d,"bytes":%d,"cache":%s,"ms":%.1f,"s3":%s}',
            json.dumps(request.method), json.dumps(path), response.status, delivered,
            json.dumps(outcome or "-"), time * 1000, json.dumps(dict(calls), separators=(",", ":")) if calls else "{}")


# -- the admin API --------------------------------------------------------------------------------------------


def _mount(parent: web.Application, admin: AdminConfig) -> None:
    if admin.token:
        # Registered before the sub-app, which would answer 404 for its bare prefix.
        parent.router.add_get(admin.path, _to_dashboard)
    sub = web.Application(middlewares=[_guard(admin)])
    sub.router.add_get("/", _dashboard, name=DASHBOARD)
    sub.router.add_get("/stats", _stats)
    sub.router.add_get("/warm", _warm_list)
    sub.router.add_post("/warm", _warm_start)
    sub.router.add_get("/warm/{id}", _warm_status)
    sub.router.add_post("/purge", _purge)
    parent.add_subapp(admin.path, sub)


def _guard(admin: AdminConfig) -> Middleware:
    token = admin.token.encode()
    allowed = frozenset(host.lower() for host in admin.allowed_hosts)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not token:
            raise web.HTTPNotFound(text="Not Found\n")
        if allowed and _hostname(request.host) not in allowed:
            # DNS rebinding: a hostile page on a name that resolves here still sends its own name as Host.
            raise _json_error(web.HTTPForbidden, "this Host is not allowed for the admin API")
        if request.match_info.route.name != DASHBOARD and not _authorized(request, token):
            raise _json_error(web.HTTPUnauthorized, "unauthorized",
                              headers={"WWW-Authenticate": 'Bearer realm="cachingproxy-admin"'})
        track_s3_calls(request)
        return await handler(request)

    return guard


def _authorized(request: web.Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


_HOST = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<name>[^:]*))(?::\d*)?$")


def _hostname(host: str) -> str:
    """The name in a Host header, without port or trailing dot: "[::1]:8080" -> "::1"."""
    match = _HOST.match(host)
    if match is None:
        return ""
    return (match["v6"] or match["name"] or "").lower().rstrip(".")


def _json_error(cls: type[web.HTTPException], message: str, **kwargs: Any) -> web.HTTPException:
    return cls(text=json.dumps({"error": message}), content_type=JSON_TYPE, **kwargs)


async def _json_object(request: web.Request) -> dict[str, Any]:
    # Only JSON: an HTML form can post urlencoded or multipart cross-site, never application/json.
    if request.content_type != JSON_TYPE:
        raise _json_error(web.HTTPUnsupportedMediaType, "send application/json")
    # A sub-app's own client_max_size is ignored (the root app builds the request), so set it here.
    limited = request.clone(client_max_size=ADMIN_MAX_BODY)
    try:
        data = await limited.json()
    except ValueError:
        raise _json_error(web.HTTPBadRequest, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _json_error(web.HTTPBadRequest, "the body must be a JSON object")
    return data


def _ops(request: web.Request) -> Ops:
    return request.config_dict[OPS]


async def _to_dashboard(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(location=request.path + "/")  # the page's relative fetches need the slash


@cache
def _page() -> tuple[bytes, str]:
    """The dashboard and a CSP that allows exactly its inline script and style, by hash (no 'unsafe-inline')."""
    page = files("cachingproxy").joinpath("dashboard.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        digests = (base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() for text in found)
        return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page.encode(), csp


async def _dashboard(request: web.Request) -> web.Response:
    body, csp = _page()
    return web.Response(body=body, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": csp, **PAGE_HEADERS})


async def _stats(request: web.Request) -> web.Response:
    ops = _ops(request)
    s3_ok = await ops.s3_reachable()  # first, so the snapshot counts the LIST it may make
    snapshot = await ops.snapshot()
    return web.json_response({**snapshot.as_json(), "s3": "ok" if s3_ok else "unreachable"}, headers=NO_STORE)


async def _warm_start(request: web.Request) -> web.Response:
    ops = _ops(request)
    body = await _json_object(request)
    prefix = body.get("prefix", "")
    if set(body) - {"prefix"} or not isinstance(prefix, str) or len(prefix) > MAX_KEY or prefix.startswith("/"):
        raise _json_error(web.HTTPBadRequest, 'send {"prefix": "guides/"}: a key prefix below [s3] prefix')
    job, created = ops.warmer.start(prefix)
    await ops.warmer.share(job)  # before the id is out: the client's next request may reach another worker
    return web.json_response({"id": job.id, "prefix": prefix, "created": created}, status=202,
                             headers={"Location": f"{request.path}/{job.id}", **NO_STORE})


async def _warm_status(request: web.Request) -> web.Response:
    job = await _ops(request).warmer.status(request.match_info["id"])
    if job is None:
        raise _json_error(web.HTTPNotFound, "no such warm job (only the latest are kept)")
    return web.json_response(job, headers=NO_STORE)


async def _warm_list(request: web.Request) -> web.Response:
    jobs = await _ops(request).warmer.statuses()
    return web.json_response({"jobs": jobs}, headers=NO_STORE)


async def _purge(request: web.Request) -> web.Response:
    ops = _ops(request)
    body = await _json_object(request)
    s3_prefix = ops.config.s3.prefix
    match body:
        case {"key": str(key)} if len(body) == 1 and 0 < len(key) <= MAX_KEY:
            purged = await ops.store.forget(s3_prefix + key)
        case {"prefix": str(prefix)} if len(body) == 1 and len(prefix) <= MAX_KEY:
            purged = await ops.store.purge_prefix(s3_prefix + prefix)
        case {"all": bool(everything)} if everything and len(body) == 1:
            purged = await ops.store.purge_prefix("")
        case _:
            raise _json_error(web.HTTPBadRequest, 'send one of {"key": "..."}, {"prefix": "..."} or {"all": true}')
    log.info("purge %s: %d entries removed", json.dumps(body), purged)
    return web.json_response({"purged": purged}, headers=NO_STORE)

"""Monitoring: /healthz and /readyz at the proxy's root, /metrics, and `Ops`, what they and the admin API share.

/healthz and /readyz need no token: they say nothing a load balancer on the office network should not know,
and change nothing. /metrics says more (traffic, cache size, what S3 was asked), so it is served where the
admin API is, behind its token (`{admin path}/metrics`), and on the public port only with
`[admin] public_metrics = true`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from .config import Config
from .counters import SITE, Counters
from .metrics import CONTENT_TYPE, Metrics, Snapshot
from .models import Clock
from .origin import OriginDenied, OriginError
from .sites import Site, Sites
from .store import CacheStore
from .tally import Tally
from .warm import JobBoard, Warmer

__all__ = ["NO_STORE", "OPS", "READY_PROBE_TIMEOUT", "Ops", "add_monitoring_routes", "metrics", "readiness"]

READY_PROBE_TIMEOUT = 2.0  # /readyz answers within this even when S3 accepts connections and never replies
NO_STORE = {"Cache-Control": "no-store"}


def readiness(cache_ok: bool, s3_ok: bool, some_s3_ok: bool | None = None) -> tuple[int, str]:
    """/readyz: "ready" when the cache and every site's bucket work; "degraded" but still 200 when something
    still serves (the cache, or some bucket); else 503. `some_s3_ok` defaults to `s3_ok` (one site)."""
    if cache_ok and s3_ok:
        return 200, "ready"
    if cache_ok or (s3_ok if some_s3_ok is None else some_s3_ok):
        return 200, "degraded"
    return 503, "unavailable"


class Ops:
    """What the operations routes share: each site's warmer, the metrics and the cached S3 reachability checks."""

    def __init__(self, config: Config, clock: Clock, store: CacheStore, sites: Sites, counters: Counters,
                 tally: Tally) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.sites = sites
        self.counters = counters
        self.metrics = Metrics(tally, sites.names)
        board = JobBoard(Path(config.cache.directory) / "warm-jobs")
        slots = asyncio.Semaphore(config.admin.warm_concurrency)  # all sites' warms together
        self.warmers = {
            site.name: Warmer(site.service, site.store, site.origin, clock, site=site.name,
                              s3_prefix=site.config.s3.prefix, concurrency=config.admin.warm_concurrency,
                              slots=slots, board=board)
            for site in sites}
        self.started = clock()
        self._s3_state: dict[str, tuple[float, bool]] = {}  # site -> (checked at, reachable)
        self._probes: dict[str, asyncio.Task[bool]] = {}

    async def s3_reachable(self) -> dict[str, bool]:
        """Each site's bucket: one 1-key ListObjectsV2 per `readiness_ttl`, shared by concurrent callers."""
        names = self.sites.names
        answers = await asyncio.gather(*(self._reachable(self.sites[name]) for name in names))
        return dict(zip(names, answers, strict=True))

    async def _reachable(self, site: Site) -> bool:
        state = self._s3_state.get(site.name)
        if state is not None and self.clock() - state[0] < self.config.admin.readiness_ttl:
            return state[1]
        probe = self._probes.get(site.name)
        if probe is None:
            probe = self._probes[site.name] = asyncio.create_task(self._check_s3(site))
            probe.add_done_callback(lambda _: self._probes.pop(site.name, None))
        return await asyncio.shield(probe)

    @property
    def warm_jobs_running(self) -> int:
        return sum(warmer.running for warmer in self.warmers.values())

    async def snapshot(self) -> Snapshot:
        rows, volume = await self.store.stats()
        return Snapshot(
            counters=self.counters.totals(),  # every worker's, not only this one's
            sites=self.counters.by_site(),
            cache_available=self.store.available,
            # One metadata row and one body row per object. An exact count would read every key (14 s for 100k
            # objects), which a dashboard refresh cannot afford.
            entries=rows // 2,
            bytes_on_disk=volume, size_limit=self.config.cache.size_limit_mb * 1024 * 1024,
            uptime=max(0.0, self.clock() - self.started), warm_jobs_running=self.warm_jobs_running,
            responses=self.metrics.responses, site_responses=self.metrics.site_responses(),
        )

    async def close(self) -> None:
        for probe in list(self._probes.values()):
            probe.cancel()
        await asyncio.gather(*(warmer.close() for warmer in self.warmers.values()))

    async def _check_s3(self, site: Site) -> bool:
        SITE.set(site.name)  # this task's own context: its LIST is the site's
        try:
            async with asyncio.timeout(READY_PROBE_TIMEOUT):
                await site.origin.list_page(site.config.s3.prefix, max_keys=1)
            ok = True
        except OriginDenied as exc:
            # AccessDenied on a list is a read-only role without s3:ListBucket: S3 answered, and GETs may well
            # work. An expired token or a bad signature is an outage for the proxy too.
            ok = exc.proves_absence
        except (OriginError, TimeoutError):
            ok = False
        self._s3_state[site.name] = (self.clock(), ok)
        return ok


OPS = web.AppKey("ops", Ops)


def add_monitoring_routes(app: web.Application, *, public_metrics: bool) -> None:
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    if public_metrics:
        app.router.add_get("/metrics", metrics)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=NO_STORE)


async def _readyz(request: web.Request) -> web.Response:
    ops = request.app[OPS]
    cache = await ops.store.check()  # "full" still serves (bodies pass through): ready, and says so
    cache_ok = cache != "failed"
    reachable = await ops.s3_reachable()
    status, word = readiness(cache_ok, all(reachable.values()), any(reachable.values()))
    body: dict[str, object] = {"status": word, "cache": cache if cache_ok else "unavailable",
                               "s3": "ok" if all(reachable.values()) else "unreachable"}
    if len(reachable) > 1:
        body["sites"] = {name: "ok" if ok else "unreachable" for name, ok in reachable.items()}
    return web.json_response(body, status=status, headers=NO_STORE)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: under the admin API's guard, or at /metrics with `public_metrics`."""
    ops = request.config_dict[OPS]  # the admin API is a sub-app: its own app has no OPS
    body = ops.metrics.render(await ops.snapshot())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, **NO_STORE})

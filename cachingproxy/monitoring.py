"""Monitoring: /healthz, /readyz and /metrics at the proxy's root, and `Ops`, what they and the admin API share.

None of these routes needs the admin token: they say nothing a load balancer or a Prometheus scraper on the
office network should not know, and they change nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from .config import Config
from .metrics import CONTENT_TYPE, Metrics, Snapshot
from .models import Clock
from .origin import OriginDenied, OriginError, S3Origin
from .service import CachingProxy
from .store import CacheStore
from .tally import Tally
from .warm import JobBoard, Warmer

__all__ = ["NO_STORE", "OPS", "READY_PROBE_TIMEOUT", "Ops", "add_monitoring_routes", "readiness"]

READY_PROBE_TIMEOUT = 2.0  # /readyz answers within this even when S3 accepts connections and never replies
NO_STORE = {"Cache-Control": "no-store"}


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
        return Snapshot(
            counters=self.service.counters.totals(),  # every worker's, not only this one's
            cache_available=self.store.available,
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


def add_monitoring_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)


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

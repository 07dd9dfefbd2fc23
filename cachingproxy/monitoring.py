"""Monitoring: /healthz and /readyz at the proxy's root, /metrics, and `Ops`, what they and the admin API share.

/healthz and /readyz need no token: they say nothing a load balancer on the office network should not know,
and change nothing. /metrics says more (traffic, cache size, what S3 was asked), so it is served where the
admin API is, behind its token (`{admin path}/metrics`), and on the public port only with
`[admin] public_metrics = true`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from .appkeys import EVENTS_HEALTH
from .config import Config
from .counters import SITE, Counters
from .metrics import CONTENT_TYPE, Metrics, Snapshot
from .models import Clock
from .origin import BucketMissing, OriginDenied, OriginError, OriginTimeout
from .s3state import S3Check, S3State, problem, readiness
from .sites import Site, Sites
from .store import CacheStore
from .tally import Tally
from .warm import JobBoard, Warmer

__all__ = ["NO_STORE", "OPS", "READY_PROBE_TIMEOUT", "Ops", "add_monitoring_routes", "metrics", "readiness"]

log = logging.getLogger(__name__)

READY_PROBE_TIMEOUT = 2.0  # /readyz answers within this even when S3 accepts connections and never replies
NO_STORE = {"Cache-Control": "no-store"}


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
        self._s3_state: dict[str, tuple[float, S3Check]] = {}  # site -> (checked at, what was found)
        self._probes: dict[str, asyncio.Task[S3Check]] = {}

    async def s3_checks(self) -> dict[str, S3Check]:
        """Each site's bucket: one 1-key ListObjectsV2 per `readiness_ttl`, shared by concurrent callers."""
        names = self.sites.names
        answers = await asyncio.gather(*(self._s3_check(self.sites[name]) for name in names))
        return dict(zip(names, answers, strict=True))

    async def _s3_check(self, site: Site) -> S3Check:
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
            config_loaded_at=self.config.loaded_at, config_hash=self.config.digest,
        )

    async def close(self) -> None:
        for probe in list(self._probes.values()):
            probe.cancel()
        await asyncio.gather(*(warmer.close() for warmer in self.warmers.values()))

    async def _check_s3(self, site: Site) -> S3Check:
        SITE.set(site.name)  # this task's own context: its LIST is the site's
        try:
            async with asyncio.timeout(READY_PROBE_TIMEOUT):
                await site.origin.list_page(site.config.s3.prefix, max_keys=1)
            check = S3Check(S3State.OK)
        except BucketMissing:
            check = S3Check(S3State.NO_SUCH_BUCKET, "NoSuchBucket")
        except OriginDenied as exc:
            # AccessDenied on a list is a read-only role without s3:ListBucket: S3 answered, and GETs may well
            # work. An expired token, a bad signature or no credentials at all stop every request.
            check = S3Check(S3State.OK if exc.proves_absence else S3State.DENIED, exc.code)
        except (OriginTimeout, TimeoutError):
            check = S3Check(S3State.UNREACHABLE, "timeout")
        except OriginError as exc:
            check = S3Check(S3State.UNREACHABLE, str(exc).strip() or exc.__class__.__name__)
        self._s3_state[site.name] = (self.clock(), check)
        return check

    async def report_buckets(self) -> None:
        """At start: check each site's bucket once and log one line per problem (s3state.problem)."""
        checks = await self.s3_checks()
        for site in self.sites:
            check = checks[site.name]
            line = problem(check, site.config.s3)
            if line is not None:
                label = f'site "{site.name}": ' if len(self.sites) > 1 else ""
                (log.warning if check.state is S3State.OK else log.error)("%s%s", label, line)


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
    checks = await ops.s3_checks()
    # Whether anything is cached matters only while S3 is unreachable (readiness): the index is not asked
    # otherwise, so a probe every few seconds costs nothing while S3 answers.
    unreachable = any(check.state is S3State.UNREACHABLE for check in checks.values())
    rows, _ = await ops.store.stats() if cache_ok and unreachable else (0, 0)
    answers = {name: readiness(cache_ok, rows > 0, check.state) for name, check in checks.items()}
    status, word, reason = _overall(answers)
    states = [check.state for check in checks.values()]
    s3 = next((state for state in states if state is not S3State.OK), S3State.OK)
    body: dict[str, object] = {"status": word, "cache": cache if cache_ok else "unavailable",
                               "s3": s3.value}
    if len(checks) > 1:
        body["sites"] = {name: check.state.value for name, check in checks.items()}
    if reason:
        body["reason"] = reason
    events = request.app.get(EVENTS_HEALTH)
    if events is not None:
        # Serving goes on without events ([events] fallback_ttl bounds every TTL meanwhile): degraded, not down.
        body["events"] = "ok" if events.ok else "unreachable"
        if not events.ok:
            body["status"] = "degraded" if word == "ready" else word
            why = "events: the queue cannot be read, every TTL is capped at fallback_ttl"
            body["reason"] = f"{reason}; {why}" if reason else why
    return web.json_response(body, status=status, headers=NO_STORE)


def _overall(answers: dict[str, tuple[int, str, str]]) -> tuple[int, str, str]:
    """One site: its answer. Several: ready when all are; 200 degraded while any can serve; else 503."""
    if len(answers) == 1:
        return next(iter(answers.values()))
    reasons = "; ".join(f"{name}: {reason}" for name, (_, _, reason) in answers.items() if reason)
    if all(word == "ready" for _, word, _ in answers.values()):
        return 200, "ready", ""
    if any(status == 200 for status, _, _ in answers.values()):
        return 200, "degraded", reasons
    return 503, "unavailable", reasons


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: under the admin API's guard, or at /metrics with `public_metrics`."""
    ops = request.config_dict[OPS]  # the admin API is a sub-app: its own app has no OPS
    body = ops.metrics.render(await ops.snapshot())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, **NO_STORE})

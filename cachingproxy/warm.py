"""Warm jobs: page through ListObjectsV2 under a prefix and fill every object the cache lacks.

A warm goes through the service's own single-flight fill, so a warmed object is stored exactly as a client
miss would store it, and a client asking for it meanwhile joins the same GetObject. An object already cached
under the ETag the listing reports is only marked checked: a warm of an unchanged prefix costs its LIST
requests and nothing else, and doubles as a bulk revalidation (an office mirror stays current on LISTs alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .counters import SITE
from .models import Clock
from .namespace import NamespacedStore
from .origin import BucketMissing, ListedObject, ObjectMissing, OriginDenied, OriginError, OriginTimeout, S3Origin
from .service import CachingProxy

__all__ = ["KEEP_FAILURES", "KEEP_JOBS", "NOT_STORED", "JobBoard", "WarmJob", "Warmer", "failure_reason"]

log = logging.getLogger(__name__)

KEEP_JOBS = 50  # finished jobs kept for GET {admin}/warm; running ones are always kept
KEEP_FAILURES = 100  # failures listed per job (`failed` counts them all)
_QUEUE_PER_WORKER = 4  # listed objects buffered ahead of the workers: listing never runs far ahead
PUBLISH_INTERVAL = 0.25  # seconds between progress files of a running job (see JobBoard)
_JOB_ID = re.compile(r"[0-9a-f]{12}")


NOT_STORED = "fetched, but the cache could not store it (see cache_write_errors)"


def failure_reason(exc: OriginError) -> str:
    """A short fixed reason; S3's own text (bucket, request ids) never reaches a client (docs/reliability.md §4)."""
    if isinstance(exc, ObjectMissing):
        return "missing: deleted since it was listed"
    if isinstance(exc, BucketMissing):
        return "the bucket does not exist"
    if isinstance(exc, OriginDenied):
        return "denied by S3"
    if isinstance(exc, OriginTimeout):
        return "S3 timed out"
    return "S3 unavailable, or the body failed verification"


@dataclass(slots=True, eq=False)
class WarmJob:
    """Progress of one warm. Mutable, unlike most values here: clients poll it while the workers move it."""

    id: str
    prefix: str  # below the site's prefix, as the client gave it
    site: str
    started: float
    listed: int = 0
    listed_bytes: int = 0
    listing_done: bool = False
    fetched: int = 0
    skipped: int = 0  # cached under the listed ETag: marked checked, not fetched
    failed: int = 0
    bytes: int = 0  # received from S3, stored or not
    processed_bytes: int = 0  # listed bytes dealt with either way, for progress and ETA
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key below [s3] prefix, reason)
    error: str | None = None  # the listing itself failed; what was listed before that is still processed
    finished: float | None = None
    finished_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def done(self) -> bool:
        return self.finished is not None

    def fail(self, key: str, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < KEEP_FAILURES:
            self.failures.append((key, reason))

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "site": self.site,
            "prefix": self.prefix,
            "listed": self.listed,
            "listed_bytes": self.listed_bytes,
            "listing_done": self.listing_done,
            "fetched": self.fetched,
            "skipped": self.skipped,
            "failed": self.failed,
            "failures": [{"key": key, "reason": reason} for key, reason in self.failures],
            "bytes": self.bytes,
            "processed_bytes": self.processed_bytes,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "done": self.done,
        }


class JobBoard:
    """Warm jobs' progress as one small JSON file per job in the cache directory.

    With [server] workers > 1 the kernel hands each admin request to any worker, so the one that runs a job is
    rarely the one asked about it: every worker publishes its jobs here (every PUBLISH_INTERVAL while running,
    and when done) and answers for the others' from here. Job ids are checked before they become file names.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def publish(self, job: dict[str, Any]) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"{job['id']}.json"
        new = not path.exists()
        tmp = path.with_name(f".{job['id']}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(job), encoding="utf-8")
        os.replace(tmp, path)  # readers see the old progress or the new, never half a file
        if new:
            self._newest()  # mirror mode starts jobs forever: keep the directory bounded without a reader

    def _newest(self) -> list[Path]:
        """The KEEP_JOBS newest job files, newest first; older ones are removed."""
        try:
            paths = sorted(self._dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return []
        for old in paths[KEEP_JOBS:]:
            with contextlib.suppress(OSError):
                old.unlink()
        return paths[:KEEP_JOBS]

    def read(self, job_id: str) -> dict[str, Any] | None:
        if not _JOB_ID.fullmatch(job_id):
            return None
        try:
            job: dict[str, Any] = json.loads((self._dir / f"{job_id}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return job

    def recent(self) -> list[dict[str, Any]]:
        """Newest first, at most KEEP_JOBS."""
        jobs = (self.read(path.stem) for path in self._newest())
        return sorted((job for job in jobs if job is not None), key=lambda job: job["started"], reverse=True)


class Warmer:
    """start / get / recent / wait / tick over warm jobs; one job per prefix at a time."""

    def __init__(self, service: CachingProxy, store: NamespacedStore, origin: S3Origin, clock: Clock, *,
                 site: str, s3_prefix: str, concurrency: int, slots: asyncio.Semaphore | None = None,
                 board: JobBoard | None = None) -> None:
        self.site = site
        self._board = board
        self._service = service
        self._store = store
        self._origin = origin
        self._clock = clock
        self._s3_prefix = s3_prefix
        self._workers = concurrency
        # Shared by every job (of every site, when given), so two warms never double the load on S3.
        self._slots = slots if slots is not None else asyncio.Semaphore(concurrency)
        self._jobs: OrderedDict[str, WarmJob] = OrderedDict()
        self._running: dict[str, WarmJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public ---------------------------------------------------------------------------------------

    def start(self, prefix: str) -> tuple[WarmJob, bool]:
        """Start a warm of `prefix`, or return the one already running for it; True when newly started."""
        running = self._running.get(prefix)
        if running is not None:
            return running, False
        job = WarmJob(id=secrets.token_hex(6), prefix=prefix, site=self.site, started=self._clock())
        self._running[prefix] = job
        self._jobs[job.id] = job
        self._trim()
        log.info("warm %s started for prefix %r", job.id, prefix)
        self._spawn(self._run(job))
        if self._board is not None:
            self._spawn(self._publish(job))
        return job, True

    def recent(self) -> list[WarmJob]:
        """Newest first."""
        return list(reversed(self._jobs.values()))

    async def share(self, job: WarmJob) -> None:
        """Publish `job` now, so that the id a client was just given is known to every worker at once."""
        if self._board is not None:
            try:
                await asyncio.to_thread(self._board.publish, job.as_dict())
            except OSError as exc:
                log.warning("warm %s: progress not shared with other workers (%s)", job.id, exc.__class__.__name__)

    async def status(self, job_id: str) -> dict[str, Any] | None:
        """A job's progress, whichever worker runs it."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job.as_dict()
        if self._board is None:
            return None
        return await asyncio.to_thread(self._board.read, job_id)

    async def statuses(self) -> list[dict[str, Any]]:
        """Recent jobs of every worker, newest first (this worker's own progress is the freshest)."""
        mine = {job.id: job.as_dict() for job in self._jobs.values()}
        shared = await asyncio.to_thread(self._board.recent) if self._board is not None else []
        merged = {**{job["id"]: job for job in shared}, **mine}
        return sorted(merged.values(), key=lambda job: job["started"], reverse=True)[:KEEP_JOBS]

    @property
    def running(self) -> int:
        return len(self._running)

    async def wait(self, job_id: str) -> WarmJob:
        """Until the job has finished (tests, and anything that must not poll)."""
        job = self._jobs[job_id]
        await job.finished_event.wait()
        return job

    def tick(self, prefixes: tuple[str, ...]) -> list[WarmJob]:
        """One round of mirror mode: a job per prefix, reusing any still running, so rounds never pile up."""
        return [self.start(prefix)[0] for prefix in prefixes]

    def start_mirror(self, prefixes: tuple[str, ...], interval: float) -> None:
        """Warm `prefixes` now and then every `interval` seconds (0: only now)."""
        self._spawn(self._mirror(prefixes, interval))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- steps ----------------------------------------------------------------------------------------

    async def _mirror(self, prefixes: tuple[str, ...], interval: float) -> None:
        while True:
            self.tick(prefixes)
            if interval <= 0:
                return
            # Real time, not the app clock: this waits, and a fake clock in tests never advances by itself.
            await asyncio.sleep(interval)

    async def _publish(self, job: WarmJob) -> None:
        """Progress for the other workers: every PUBLISH_INTERVAL (real time) while running, and at the end."""
        while not job.done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.finished_event.wait(), PUBLISH_INTERVAL)
            await self.share(job)

    async def _run(self, job: WarmJob) -> None:
        queue: asyncio.Queue[ListedObject | None] = asyncio.Queue(maxsize=self._workers * _QUEUE_PER_WORKER)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self._workers):
                    group.create_task(self._work(job, queue))
                await self._list(job, queue)
                for _ in range(self._workers):
                    await queue.put(None)
        finally:
            job.finished = self._clock()
            job.finished_event.set()
            if self._running.get(job.prefix) is job:
                del self._running[job.prefix]
            self._trim()
            log.info("warm %s finished: %d listed, %d fetched (%d bytes), %d unchanged, %d failed%s", job.id,
                     job.listed, job.fetched, job.bytes, job.skipped, job.failed,
                     f"; {job.error}" if job.error else "")

    async def _list(self, job: WarmJob, queue: asyncio.Queue[ListedObject | None]) -> None:
        token: str | None = None
        while True:
            try:
                page, token = await self._origin.list_page(self._s3_prefix + job.prefix, token)
            except OriginError as exc:
                job.error = "listing failed: " + failure_reason(exc)
                return
            for item in page:
                if item.key.endswith("/"):
                    continue  # a "folder" placeholder: keys.py serves dir/ as dir/index.html, never this key
                job.listed += 1
                job.listed_bytes += item.size
                await queue.put(item)
            if token is None:
                job.listing_done = True
                return

    async def _work(self, job: WarmJob, queue: asyncio.Queue[ListedObject | None]) -> None:
        while (item := await queue.get()) is not None:
            async with self._slots:
                await self._warm_one(job, item)

    async def _warm_one(self, job: WarmJob, item: ListedObject) -> None:
        key = item.key[len(self._s3_prefix):]
        try:
            if await self._service.confirm_listed(item.key, item.etag):
                job.skipped += 1
            else:
                meta = await self._service.prefetch(item.key)
                job.bytes += meta.size
                # The fill serves its readers even when the cache cannot index the body (a SQLite lock timeout
                # under load, a full disk), but a warm exists to have it on disk before an outage: say so.
                stored = await self._store.lookup(item.key)
                if stored is None or stored.meta.etag != meta.etag:
                    job.fail(key, NOT_STORED)
                else:
                    job.fetched += 1
        except OriginError as exc:
            job.fail(key, failure_reason(exc))
        except Exception:
            # One odd object must not end the job: it is reported like any other failure.
            log.exception("warm %s: unexpected error on one object", job.id)
            job.fail(key, "internal error")
        job.processed_bytes += item.size

    # -- plumbing -------------------------------------------------------------------------------------

    def _trim(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.done]
        for job_id in finished[:max(0, len(finished) - KEEP_JOBS)]:
            del self._jobs[job_id]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # A fresh context: the job outlives the admin request that started it, and S3 calls it makes must not
        # be attributed to that request in the access log (counters.S3_CALLS is a context variable).
        context = contextvars.Context()
        context.run(SITE.set, self.site)  # its counts are this site's
        task = asyncio.create_task(coro, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

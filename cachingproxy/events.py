"""The events consumer: S3 notifications from SQS applied to the cache through each site's service.

One consumer per proxy, in the leader worker (app.py `_events_ctx`). It long-polls the queue, parses each
message (events_parse.py), applies every object event to each site whose bucket and prefix contain the key,
then deletes the batch: the same receive/apply/batch-delete/backoff loop as the AWS SDK examples. An event
becomes what a request would do (mark stale, drop, fetch), so events and requests meet only in the service.

The other workers see the result through the shared cache, and the consumer's health through the shared tally
(`EventHealth`): while it cannot read the queue, no entry anywhere is served longer than `fallback_ttl`
without revalidation.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Coroutine
from typing import Any

from .config import EventsConfig
from .counters import SITE, Counters
from .events_parse import Kind, Malformed, ObjectEvent, is_newer, parse_message
from .metrics import observe_event_lag
from .models import Clock
from .namespace import namespace_for
from .origin import OriginError
from .policy import windows_for
from .queue import Message, QueueError, SqsQueue
from .service import NotRecorded
from .sites import Site, Sites
from .tally import Tally

__all__ = ["HEALTH_CELL", "EventConsumer", "EventHealth"]

log = logging.getLogger(__name__)

HEALTH_CELL = "events.healthy_until_ms"  # a tally gauge: see EventHealth
LAST_KEPT = 100_000  # keys whose last applied event is remembered (order and duplicates)
POISON_KEPT = 1_000  # message ids already logged as malformed
BACKOFF_FIRST = 1.0  # seconds before retrying a failed receive, doubling up to BACKOFF_MAX
BACKOFF_MAX = 60.0


class EventHealth:
    """Whether the consumer is reading the queue, as every worker sees it.

    The leader writes a lease into its own row of the shared tally: "healthy until" in CLOCK_MONOTONIC
    milliseconds, which all processes on the host share. A lease rather than a flag, so a leader that dies
    or hangs stops counting as healthy by itself; the fake clock of tests never moves it.
    """

    def __init__(self, tally: Tally, lease: float) -> None:
        self._tally = tally
        self._lease_ms = round(lease * 1000)

    def renew(self) -> None:
        self._tally.set(HEALTH_CELL, _now_ms() + self._lease_ms)

    def lost(self) -> None:
        self._tally.set(HEALTH_CELL, 0)

    @property
    def ok(self) -> bool:
        return self._tally.highest(HEALTH_CELL) > _now_ms()


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class EventConsumer:
    """run() until cancelled; sweep() once. Holds the per-key order of applied events and the refreshes."""

    def __init__(self, queue: SqsQueue, sites: Sites, config: EventsConfig, clock: Clock, counters: Counters,
                 tally: Tally, health: EventHealth) -> None:
        self._queue = queue
        self._sites = sites
        self._config = config
        self._clock = clock
        self._counters = counters
        self._tally = tally
        self._health = health
        self._last: collections.OrderedDict[tuple[str, str], ObjectEvent] = collections.OrderedDict()
        self._poison: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Refreshes, coalesced: per (namespace, key) at most one running and one wanted after it.
        self._wanted: dict[tuple[str, str], tuple[Site, ObjectEvent]] = {}
        self._refreshing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(config.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self.swept = asyncio.Event()  # set after each sweep (tests, and the benchmark)
        # Sites that share a namespace (same endpoint and bucket) share entries: the store is written once.
        groups: dict[str, list[Site]] = {}
        for site in sites:
            groups.setdefault(namespace_for(site.config.s3), []).append(site)
        self._groups = groups

    # -- public ---------------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The last receive worked (as every worker sees it: EventHealth)."""
        return self._health.ok

    async def run(self) -> None:
        """Receive, apply, delete, for ever; a queue failure marks the consumer unhealthy and backs off."""
        self._health.lost()  # until the first receive works: a restarted leader may have missed events
        backoff = BACKOFF_FIRST
        while True:
            try:
                messages = await self._queue.receive()
            except QueueError:
                self._counters.add("events_queue_errors")
                self._health.lost()
                # Real time: this waits, and the app clock of tests never advances by itself.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._health.renew()
            backoff = BACKOFF_FIRST
            done = [message for message in messages if await self.handle(message)]
            try:
                await self._queue.delete(tuple(done))
            except QueueError:
                self._counters.add("events_queue_errors")  # they come back and are applied again: harmless

    async def handle(self, message: Message) -> bool:
        """Apply one message; True when it may be deleted (applied, ignored or poison), False to see it again."""
        try:
            events = parse_message(message.body)
        except Malformed as exc:
            self._counters.add("events_malformed")
            if message.id not in self._poison:
                # The id, never the body: a body may hold anything, and it is deleted so it cannot loop.
                log.warning("events: message %s is not a notification (%s); deleted", message.id, exc)
                self._poison[message.id] = None
                while len(self._poison) > POISON_KEPT:
                    self._poison.popitem(last=False)
            return True
        if not events:
            self._counters.add("events_ignored")  # s3:TestEvent, tagging, ACL and restore events
            return True
        try:
            for event in events:
                self._counters.add("events_received")
                await self._apply(event)
        except NotRecorded:
            # The entry would stay fresh for the whole (long) TTL: SQS delivers the message again instead.
            log.warning("events: the cache could not record message %s; it will be delivered again", message.id)
            return False
        except Exception:
            # The store or the loop failed under us: leave the message for redelivery (applying twice is safe).
            log.exception("events: applying message %s failed; it will be delivered again", message.id)
            return False
        return True

    async def sweep(self) -> None:
        """LIST every site's prefix and compare ETags with the cache: catches events lost while the proxy was
        down or after the queue's retention ran out. 1 request per 1,000 keys; unchanged entries are confirmed
        (as fresh as after a 304), changed ones marked stale."""
        seen: set[tuple[str, str]] = set()
        for namespace, group in self._groups.items():
            for site in group:
                prefix = site.config.s3.prefix
                if any(namespace == ns and prefix.startswith(p) for ns, p in seen):
                    continue  # another site's sweep already covers this prefix of the same bucket
                seen.add((namespace, prefix))
                context = contextvars.copy_context()
                context.run(SITE.set, site.name)
                try:
                    await asyncio.create_task(self._sweep_site(site, group), context=context)
                except (OriginError, NotRecorded):
                    log.warning("events: sweep of site %s failed; the next sweep tries again", site.name)
        self.swept.set()

    async def settle(self) -> None:
        """Until no refresh is running or wanted (tests, and the benchmark)."""
        while self._refreshing:
            await asyncio.gather(*self._refreshing.values(), return_exceptions=True)

    async def close(self) -> None:
        tasks = [*self._tasks, *self._refreshing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- steps ----------------------------------------------------------------------------------------

    def _targets(self, event: ObjectEvent) -> list[list[Site]]:
        """The sites (grouped by namespace) whose bucket and prefix contain the key. A site on AWS itself (no
        endpoint_url) must also be in the event's region; bucket names are unique within a partition."""
        out = []
        for group in self._groups.values():
            s3 = group[0].config.s3
            if s3.bucket != event.bucket:
                continue
            if not s3.endpoint_url and event.region and event.region != s3.region:
                continue
            matching = [site for site in group if event.key.startswith(site.config.s3.prefix)]
            if matching:
                out.append(matching)
        return out

    async def _apply(self, event: ObjectEvent) -> None:
        groups = self._targets(event)
        last_key = (event.bucket, event.key)
        if not groups or not is_newer(event, self._last.get(last_key)):
            self._counters.add("events_ignored")  # for no site, or older than (or equal to) one applied
            return
        for group in groups:
            for site in group:
                _forget_listing(site, event.key)
            if event.kind is Kind.REMOVED:
                for site in group:
                    await site.service.drop(event.key)
                continue
            site = group[0]
            if event.etag and await site.service.confirm_listed(event.key, event.etag):
                continue  # the cache already holds this version (a duplicate, or a request got there first)
            ttl = max(_ttl(s, event.key) for s in group)
            cached = await site.service.mark_stale(event.key, ttl)
            for other in group[1:]:
                await other.service.mark_stale(event.key, ttl)  # the others' negative caches; the entry is shared
            if cached and self._config.refresh:
                self._want_refresh(site, event)
        self._last[last_key] = event
        self._last.move_to_end(last_key)
        while len(self._last) > LAST_KEPT:
            self._last.popitem(last=False)
        self._counters.add("events_applied")
        if event.time is not None:
            observe_event_lag(self._tally, self._clock() - event.time)

    def _want_refresh(self, site: Site, event: ObjectEvent) -> None:
        """Coalesce: a burst of events for one key starts one refresh, and at most one more after it."""
        key = (namespace_for(site.config.s3), event.key)
        self._wanted[key] = (site, event)
        if key in self._refreshing:
            return
        context = contextvars.copy_context()
        context.run(SITE.set, site.name)  # its S3 requests count as the site's
        task = asyncio.create_task(self._refresh(key), context=context)
        self._refreshing[key] = task
        task.add_done_callback(lambda t: self._refreshing.pop(key, None) if self._refreshing.get(key) is t else None)

    async def _refresh(self, key: tuple[str, str]) -> None:
        while (wanted := self._wanted.pop(key, None)) is not None:
            site, event = wanted
            async with self._slots:  # bounded: a 5,000-object publish is never 5,000 GETs at once
                if event.etag and await site.service.confirm_listed(event.key, event.etag):
                    continue  # a request's revalidation fetched this version while the refresh waited
                try:
                    meta = await site.service.prefetch(event.key)
                except OriginError:
                    continue  # the entry stays stale: the next request revalidates it
                if event.etag and meta.etag != event.etag:
                    # The fill joined was older than the event (it began before the upload): stale again.
                    try:
                        await site.service.mark_stale(event.key, _ttl(site, event.key))
                    except NotRecorded:
                        log.warning("events: the cache could not mark a refreshed key stale; the sweep will")

    async def _sweep_site(self, site: Site, group: list[Site]) -> None:
        prefix = site.config.s3.prefix
        cached = set(await site.store.keys(prefix))  # before listing: a key cached meanwhile is not dropped
        token: str | None = None
        while True:
            page, token = await site.origin.list_page(prefix, token)
            cached.difference_update(item.key for item in page)

            async def one(key: str, etag: str) -> None:
                async with self._slots:
                    if not await site.service.confirm_listed(key, etag):
                        # A no-op for keys not cached: a sweep never fills, it only revalidates.
                        await site.service.mark_stale(key, max(_ttl(s, key) for s in group))

            await asyncio.gather(*(one(item.key, item.etag) for item in page if not item.key.endswith("/")))
            if token is None:
                break
        # Cached, yet no longer listed: deleted while no event reached us. Dropped like an ObjectRemoved.
        for key in cached:
            for other in group:
                if key.startswith(other.config.s3.prefix):
                    await other.service.drop(key)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """The sweep at start, then the loop; a sweep every `sweep_interval` seconds beside it."""
        self._spawn(self.run())
        self._spawn(self._sweeps())

    async def _sweeps(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("events: sweep failed")
            if self._config.sweep_interval <= 0:
                return
            await asyncio.sleep(self._config.sweep_interval)  # real time, as warm.py's mirror mode


def _ttl(site: Site, key: str) -> float:
    prefix = site.config.s3.prefix
    return windows_for(key[len(prefix):] if key.startswith(prefix) else key, site.config.cache).ttl


def _forget_listing(site: Site, key: str) -> None:
    """This worker's rendered listing of the key's folder is out of date (other workers keep theirs for the
    site's TTL)."""
    site.listings.pop(key.rpartition("/")[0] + "/" if "/" in key else "", None)

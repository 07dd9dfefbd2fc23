"""The driver: lookup -> policy.decide -> S3 -> store, with single-flight fills and revalidations.

Pure decisions live in `policy`; this is the only module that awaits both S3 and the cache.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, assert_never

from .config import CacheConfig
from .counters import Counters
from .fill import Fill
from .filling import Fills
from .models import Clock, Entry, HeldBody, ObjectMeta, Outcome
from .namespace import NamespacedStore
from .origin import ObjectMissing, OriginError, OriginTimeout, OriginUnavailable, S3Origin
from .policy import (
    Breaker,
    Confirm,
    Fail,
    Fetch,
    Health,
    Revalidate,
    Serve,
    ServeAndRefresh,
    ServeStale,
    Windows,
    decide,
)

__all__ = ["CachingProxy", "FromCache", "FromFill", "FromHead", "NotRecorded", "Resolved"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_ANY = Windows(ttl=0.0)  # a listing's row of the decision table does not depend on the TTL
NEGATIVE_CACHE_MAX = 10_000  # bounded and kept apart from bodies: random 404s never evict real entries


class NotRecorded(Exception):
    """The cache could not record a change to an entry (its index locked or failing): try again later."""


@dataclass(frozen=True, slots=True)
class FromCache:
    entry: Entry
    outcome: Outcome
    body: BinaryIO | HeldBody | None  # an open file, or a small body held in memory (store.HOT_BODY_MAX); None for HEAD


@dataclass(frozen=True, slots=True)
class FromFill:
    fill: Fill
    meta: ObjectMeta
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class FromHead:
    meta: ObjectMeta
    outcome: Outcome


Resolved = FromCache | FromFill | FromHead


@dataclass(frozen=True, slots=True)
class _Unchanged:
    entry: Entry


@dataclass(frozen=True, slots=True)
class _Changed:
    meta: ObjectMeta


class CachingProxy:
    """resolve(key) for the HTTP layer; owns single-flight state, the negative cache and the counters."""

    def __init__(self, cache: CacheConfig, store: NamespacedStore, origin: S3Origin, clock: Clock,
                 counters: Counters, breaker: Breaker) -> None:
        self._cache_config = cache
        self._store = store
        self._origin = origin
        self._clock = clock
        self.counters = counters
        self._fills = Fills(store, origin, clock, counters, self._ask, self._remember_missing)
        self._revalidations: dict[str, asyncio.Task[_Unchanged | _Changed]] = {}
        self._heads: dict[str, asyncio.Task[ObjectMeta]] = {}
        self._negative: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._sharers: collections.Counter[asyncio.Task[Any]] = collections.Counter()  # awaiters per shared task
        self._breaker = breaker  # shared by the sites whose S3 client this is

    # -- public ---------------------------------------------------------------------------------------

    def hit_in_memory(self, key: str, *, ttl: float) -> FromCache | None:
        """A fresh GET hit whose entry and body this worker holds in memory: answered without awaiting anything.

        The same answer `resolve` would give (a fill in flight for the key is joined there instead); None
        sends the request down `resolve`.
        """
        found = self.fresh_in_memory(key, ttl, self._clock())
        if found is None:
            return None
        self.counters.add("hits")
        return FromCache(found[0], Outcome.HIT, found[1])

    def fresh_in_memory(self, key: str, ttl: float, now: float) -> tuple[Entry, HeldBody] | None:
        """`hit_in_memory`'s checks at `now`, without counting: for fasthit.py, which may still hand the
        request on, and needs no FromCache when it answers from what it made for the same entry before."""
        return None if key in self._fills else self._store.fresh_in_memory(key, ttl, now)

    async def resolve(self, key: str, *, windows: Windows, want_body: bool) -> Resolved:
        """Find the best answer for `key`; raises ObjectMissing or another OriginError when there is none.

        Executes what `policy.decide` says, and asks it again after anything that changes the inputs (S3
        failed, the body turned out evicted); every choice is the table's.
        """
        if not await self._committed(key) and want_body and key in self._fills:
            return await self._join(self._fills.start(key), Outcome.MISS)
        entry = await self._store.lookup(key)
        if entry is None:
            # Another worker may be indexing this key: wait for its commit, then look again. Again even when
            # no lock was found, since a commit that ended after the first lookup leaves none, and this would
            # fetch the object a second time. A miss, which goes to S3 anyway, pays the second lookup; a hit
            # pays nothing.
            await self._store.committing_elsewhere(key)
            entry = await self._store.lookup(key)
        health = self._breaker.health(self._clock())
        error: OriginError | None = None
        while True:
            action = decide(entry, self._clock(), windows, health)
            match action:
                case Serve() | Confirm():  # Confirm needs a listing, which requests never have
                    assert entry is not None
                    found = await self._from_cache(entry, Outcome.HIT, want_body)
                    if found is not None:
                        self.counters.add("hits")
                        return found
                case ServeAndRefresh():
                    assert entry is not None
                    found = await self._from_cache(entry, Outcome.STALE, want_body)
                    if found is not None:
                        self.counters.add("stale")
                        self._start_shared(self._revalidations, key, functools.partial(self._refresh, entry))
                        return found
                case ServeStale():
                    assert entry is not None
                    found = await self._from_cache(entry, Outcome.STALE, want_body)
                    if found is not None:
                        self.counters.add("stale")
                        return found
                case Revalidate():
                    assert entry is not None
                    try:
                        result = await self._shared(self._revalidations, key,
                                                    functools.partial(self._revalidate, entry))
                    except ObjectMissing:
                        raise
                    except OriginError as exc:
                        error, health = exc, _failed(exc)
                        continue
                    if isinstance(result, _Unchanged):
                        found = await self._from_cache(result.entry, Outcome.REVALIDATED, want_body)
                        if found is not None:
                            return found
                    elif not want_body:
                        return FromHead(result.meta, Outcome.MISS)
                    try:
                        return await self._fetch(key, want_body)
                    except ObjectMissing:
                        raise
                    except OriginError as exc:
                        error, health = exc, _failed(exc)  # the old copy may still be served stale
                        continue
                case Fetch():
                    try:
                        return await self._fetch(key, want_body)
                    except OriginError as exc:
                        if entry is None or isinstance(exc, ObjectMissing):
                            raise
                        error, health = exc, _failed(exc)
                        continue
                case Fail():
                    raise error if error is not None else OriginUnavailable("no answer")
                case _:
                    assert_never(action)
            # The body was evicted or found damaged after the lookup: that is a miss, not an error.
            entry = None

    async def _committed(self, key: str, *, elsewhere: bool = False) -> bool:
        """Whether a fill of `key` (in this worker; `elsewhere`: in any) had sent its last byte but not yet
        indexed its body, which it now has (or the cache refused it): so a request is a hit, and an event's
        invalidation is not undone by that commit."""
        committing = self._fills.committing(key)
        if committing is None:
            return elsewhere and await self._store.committing_elsewhere(key)
        await asyncio.shield(committing.settled())
        return True

    async def committed_under(self, prefix: str) -> None:
        """Until every fill under `prefix` that had sent its last byte has indexed its body: a purge must not be
        undone by a commit that ends just after it."""
        for fill in self._fills.committing_under(prefix):
            await asyncio.shield(fill.settled())

    async def confirm_listed(self, key: str, etag: str) -> bool:
        """A listing reports `etag` for `key`: True when the cached copy is that version, with a body that opens
        (then it is marked checked, as after a 304); False when it needs fetching (warm-up)."""
        await self._committed(key, elsewhere=True)
        entry = await self._store.lookup(key)
        if entry is None or not isinstance(decide(entry, self._clock(), _ANY, listed_etag=etag), Confirm):
            return False
        # Metadata and body are separate diskcache rows and LRU eviction can take the body alone; open_body
        # also drops a body whose size is wrong. Either way the object needs fetching.
        body = await self._store.open_body(entry)
        if body is None:
            return False
        await self._store.close_body(body)
        await self._store.mark_checked(entry.checked(entry.meta, self._clock()))
        return True

    async def mark_stale(self, key: str, ttl: float) -> bool:
        """An event says `key` changed: its entry becomes stale for every worker, as if `ttl` ran out just now,
        so the next request revalidates (and stale-if-error still counts from now). False when not cached.

        Through the store, not this worker's memory: mark_checked also changes the shared stamp, which makes
        every worker drop its in-memory copy of the entry."""
        self._negative.pop(key, None)
        await self._committed(key, elsewhere=True)
        entry = await self._store.lookup(key)
        if entry is None:
            return False
        now = self._clock()
        if not await self._store.mark_checked(entry.checked(entry.meta, min(entry.checked_at, now - ttl))):
            raise NotRecorded(key)
        return True

    async def drop(self, key: str) -> None:
        """An event says `key` was deleted: forget the entry (every worker) and answer 404 without asking S3
        for negative_ttl (this worker; the others learn it from S3 on their next request)."""
        await self._committed(key, elsewhere=True)
        await self._store.forget(key)
        self._remember_missing(key)
        if await self._store.lookup(key) is not None:
            raise NotRecorded(key)  # the index refused the delete (locked, failing): the entry is still served

    async def exists(self, key: str) -> bool:
        """Whether `key` is cached or in S3; used for the `dir` -> `dir/` redirect."""
        if await self._store.lookup(key) is not None:
            return True
        try:
            await self._head(key)
        except OriginError:
            return False
        return True

    def waiting(self, key: str) -> int:
        """Requests now sharing the in-flight fill or revalidation of `key` (0 when there is none).

        Observability for tests: they hold S3 and wait until N requests share the work before letting it
        answer, instead of sleeping and hoping that N requests have arrived by then.
        """
        fill = self._fills.in_flight(key)
        task = self._revalidations.get(key)
        return (fill.readers if fill is not None else 0) + (self._sharers[task] if task is not None else 0)

    async def settle(self) -> None:
        """Wait for background fills and revalidations (tests, and graceful shutdown before closing the store)."""
        while pending := [*self._fills.tasks, *self._revalidations.values()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self, grace: float = 0.0) -> None:
        """Let running fills finish for up to `grace` seconds (so nothing is lost on SIGTERM), then cancel."""
        if grace > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.settle()
        tasks = [*self._fills.tasks, *self._revalidations.values(), *self._heads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- steps ----------------------------------------------------------------------------------------

    async def _from_cache(self, entry: Entry, outcome: Outcome, want_body: bool) -> FromCache | None:
        if not want_body:
            return FromCache(entry, outcome, None)
        body = await self._store.open_body(entry)
        # The body can be evicted or found damaged after the lookup; that is a miss, not an error.
        return None if body is None else FromCache(entry, outcome, body)

    async def _refresh(self, entry: Entry) -> _Unchanged | _Changed:
        """Background revalidation for stale-while-revalidate; a changed object is refetched behind it."""
        result = await self._revalidate(entry)
        if isinstance(result, _Changed):
            self._fills.start(entry.key)
        return result

    async def _revalidate(self, entry: Entry) -> _Unchanged | _Changed:
        try:
            meta = await self._head(entry.key)
        except ObjectMissing:
            await self._store.forget(entry.key)
            raise
        if meta.etag == entry.meta.etag and meta.size == entry.meta.size:
            # Same body; S3 may still have changed Content-Type or Cache-Control, so keep its new headers.
            fresh = entry.checked(meta, self._clock())
            await self._store.mark_checked(fresh)
            self.counters.add("revalidated_unchanged")
            return _Unchanged(fresh)
        self.counters.add("revalidated_changed")
        return _Changed(meta)

    async def _head(self, key: str) -> ObjectMeta:
        return await self._shared(self._heads, key, lambda: self._head_once(key))

    async def _head_once(self, key: str) -> ObjectMeta:
        if self._known_missing(key):
            raise ObjectMissing(key)
        try:
            return await self._ask(lambda: self._origin.head(key))
        except ObjectMissing:
            self._remember_missing(key)
            raise

    def _remember_missing(self, key: str) -> None:
        if self._cache_config.negative_ttl <= 0:
            return
        now = self._clock()
        self._negative[key] = now + self._cache_config.negative_ttl
        self._negative.move_to_end(key)
        # One TTL for all, so the oldest expire first: dropping them from the front holds one TTL's worth of
        # 404s, where waiting for the bound kept 10,000 long-expired keys per worker under a stream of new ones.
        negative = self._negative
        while negative and (len(negative) > NEGATIVE_CACHE_MAX or next(iter(negative.values())) <= now):
            negative.popitem(last=False)

    def _known_missing(self, key: str) -> bool:
        expires = self._negative.get(key)
        if expires is not None and self._clock() < expires:
            self.counters.add("negative_hits")
            return True
        return False

    async def _fetch(self, key: str, want_body: bool) -> Resolved:
        if self._known_missing(key):
            raise ObjectMissing(key)
        if not want_body:
            meta = await self._head(key)
            self.counters.add("misses")
            return FromHead(meta, Outcome.MISS)
        self.counters.add("misses")
        return await self._join(self._fills.start(key), Outcome.MISS)

    async def _join(self, fill: Fill, outcome: Outcome) -> FromFill:
        # Counted before waiting, not after: the staging fd must outlive every joined request, and a fill
        # can end before its waiters resume (one that adopts another worker's body ends at once).
        fill.readers += 1
        try:
            # shield: a client that leaves must not cancel the fill other clients are waiting on.
            meta = await asyncio.shield(fill.ready)
        except BaseException:
            fill.leave()
            raise
        return FromFill(fill, meta, outcome)

    # -- plumbing -------------------------------------------------------------------------------------

    async def _ask(self, call: Callable[[], Awaitable[T]]) -> T:
        """Every HEAD and GET reports to the breaker; the breaker never refuses one (see policy.Breaker)."""
        self._breaker.sending(self._clock())
        try:
            result = await call()
        except (OriginUnavailable, OriginTimeout):
            self._breaker.failure(self._clock())
            raise
        except OriginError:
            self._breaker.success()  # S3 answered (404, 403): it is up
            raise
        self._breaker.success()
        return result

    @staticmethod
    def _start_shared(table: dict[str, asyncio.Task[T]], key: str,
                      work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        task = table.get(key)
        if task is None:
            task = table[key] = asyncio.create_task(work())
            task.add_done_callback(lambda t: table.pop(key) if table.get(key) is t else None)
            # Background work may fail with nobody awaiting it; retrieve the exception so it is not logged.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _shared(self, table: dict[str, asyncio.Task[T]], key: str,
                      work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `work()` once per key at a time; everyone else awaits the same task.

        shield: one client leaving must not cancel the work the others are waiting on.
        """
        task = self._start_shared(table, key, work)
        self._sharers[task] += 1  # counted for `waiting`
        try:
            return await asyncio.shield(task)
        finally:
            self._sharers[task] -= 1
            if not self._sharers[task]:
                del self._sharers[task]

    async def prefetch(self, key: str) -> ObjectMeta:
        """Fill `key` with no client waiting (warm jobs): the same single-flight fill as a miss, awaited to the end.

        Returns the stored version's metadata, or raises the fill's OriginError. Not counted as a miss.
        """
        self._negative.pop(key, None)  # a listing has just shown that the key exists
        fill = self._fills.start(key)
        await fill.verified_body()
        await fill.settled()  # stored (a warm job reports what the cache holds)
        return fill.ready.result()


def _failed(exc: OriginError) -> Health:
    return Health.TIMED_OUT if isinstance(exc, OriginTimeout) else Health.FAILED

"""Fills: one GetObject per key in this process, and across worker processes, verified and committed.

A miss starts a fill, and every request for that key joins it (fill.py). Across workers, the store's fill
locks let a worker that finds another filling the same key stream from that fill's staging file as it grows
(`_follow`), or, when that fill ends without a body for it (failed, or its worker died), take over.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .counters import Counters
from .fill import CHUNK_SIZE, Fill
from .models import Clock, ObjectMeta
from .namespace import NamespacedStore
from .origin import BodyCorrupt, ObjectBody, ObjectMissing, OriginDenied, OriginError, OriginUnavailable, S3Origin
from .store import Published
from .writebehind import WriteBehind

__all__ = ["Fills"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a worker following another's fill looks at its staging file and its lock: the delay a reader
# there sees after S3's bytes, and after the filler dies, before a takeover starts.
_FOLLOW_POLL = 0.01
_FILL_ROUNDS = 3  # follow, take over, follow a third worker's takeover; then fetch without the lock


class Fills:
    """start(key) -> the Fill every request for `key` joins; `tasks` for settling and shutdown."""

    def __init__(self, store: NamespacedStore, origin: S3Origin, clock: Clock, counters: Counters,
                 ask: Callable[[Callable[[], Awaitable[ObjectBody]]], Awaitable[ObjectBody]],
                 on_missing: Callable[[str], None]) -> None:
        self._store = store
        self._origin = origin
        self._clock = clock
        self._counters = counters
        self._ask = ask  # the service's breaker-aware call (service.CachingProxy._ask)
        self._on_missing = on_missing  # the negative cache
        self._fills: dict[str, Fill] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._fills

    def in_flight(self, key: str) -> Fill | None:
        return self._fills.get(key)

    def committing(self, key: str) -> Fill | None:
        """The fill of `key` whose body is complete and verified but not yet in the index, if there is one."""
        fill = self._fills.get(key)
        return fill if fill is not None and fill.verified else None

    def committing_under(self, prefix: str) -> list[Fill]:
        return [fill for key, fill in self._fills.items() if fill.verified and key.startswith(prefix)]

    def start(self, key: str) -> Fill:
        """The fill of `key` in flight in this process, or a new one."""
        fill = self._fills.get(key)
        if fill is None:
            fill = self._fills[key] = Fill(key, functools.partial(self._read_part, key))
            self._spawn(self._run_fill(fill))
        return fill

    async def _run_fill(self, fill: Fill) -> None:
        key = fill.key
        started = self._clock()
        try:
            for _ in range(_FILL_ROUNDS):
                # Single-flight across worker processes too: held until the body is committed. A worker
                # that finds another filling streams from that fill's staging file (`_follow`); if that fill
                # ends without a body for it (failed, or its worker died), it tries to take over.
                async with self._store.fill_lock(key) as flight:
                    if flight.follow is not None:
                        if flight.follow.path is None:
                            break  # the other fill passes through (disk full): nothing to read, fetch here
                        if await self._follow(fill, flight.follow, started):
                            return
                        continue
                    if flight.waited and await self._adopt(fill, started):
                        return
                    await self._fill_from_s3(fill, publish=True)
                    return
            await self._fill_from_s3(fill, publish=False)
        except ObjectMissing as exc:
            self._on_missing(key)
            fill.fail(exc)
        except OriginDenied as exc:
            if exc.proves_absence:
                self._on_missing(key)
            fill.fail(exc)
        except OriginError as exc:
            if isinstance(exc, BodyCorrupt):
                self._counters.add("integrity_failures")
            fill.fail(exc)
        except Exception:
            log.exception("fill failed")
            fill.fail(OriginUnavailable("internal"))
        finally:
            if not fill.verified and fill.error is None:
                fill.fail(OriginUnavailable("fill cancelled"))  # shutdown: never leave a reader waiting
            fill.done = True
            fill.notify()  # `settled` waiters
            if self._fills.get(key) is fill:
                del self._fills[key]
            if fill.staging is not None and not fill.verified:
                await self._store.discard(fill.staging)
            fill.close_if_unused()

    async def _fill_from_s3(self, fill: Fill, *, publish: bool) -> None:
        """GetObject into a new staging file, verify, commit. When readers already follow another worker's
        copy (a takeover), only the same version will do: If-Match its ETag."""
        key = fill.key
        etag = fill.ready.result().etag if fill.ready.done() else None
        body = await self._ask(lambda: self._origin.get(key, etag=etag))
        try:
            staging = await self._store.stage(key, body.meta)
            if body.crc32 is not None:
                staging.check_crc32(body.crc32)  # on the write-behind thread, reading S3's pieces uncopied
            elif body.checked:
                staging.checked_elsewhere()
            if publish:
                self._store.publish(staging)
            fill.replace_staging(staging)
            if not fill.ready.done():
                fill.ready.set_result(body.meta)
            behind = WriteBehind(staging, self._store.flush)
            async for chunk in body.pieces(CHUNK_SIZE) if body.crc32 is not None else body.chunks(CHUNK_SIZE):
                await behind.put(chunk)  # readers take it from memory until it is on disk
                self._counters.add("bytes_from_s3", len(chunk))
                fill.notify()
            await behind.finish()  # all on disk (and through the MD5, if any) before the verdict
        finally:
            body.close()
        problem = staging.problem()
        if problem is not None:
            log.error("S3 body failed verification (%s); not cached, readers cut off", problem)
            raise BodyCorrupt(problem)
        # The last byte goes out now: the client need not wait for fdatasync and the index (0.04-0.05 s per
        # 100 MiB). A request for the key meanwhile waits for the commit (service.resolve), so it is a hit.
        fill.verified = True
        fill.notify()
        if publish:
            self._store.publish(staging, verified=True)  # other workers' requests wait for the commit too
        await self._store.commit(staging, self._clock())

    async def _follow(self, fill: Fill, other: Published, since: float) -> bool:
        """Serve another worker's fill of the same key from its staging file as it grows, until it ends.

        True when it committed the body (then it is ours too); False when it ended without one: failed, or
        its worker died, which its flock shows at once, so a taker-over starts within one poll.
        """
        staging = await self._store.follow(fill.key, other)
        if staging is None:
            return await self._until_finished(other) and await self._adopt(fill, since)
        if fill.ready.done() and fill.ready.result().etag != other.meta.etag:
            staging.close()  # another version than the one our readers have begun: no use to them
            return False
        fill.replace_staging(staging)
        if not fill.ready.done():
            fill.ready.set_result(other.meta)
        fill.notify()
        while True:
            ended = self._store.finished(other)  # before the last look at the file, so that look sees all
            if staging.observe():
                fill.notify()
            if ended:
                break
            await asyncio.sleep(_FOLLOW_POLL)
        if staging.written == other.meta.size:
            entry = await self._store.lookup(fill.key)
            if entry is not None and entry.meta.etag == other.meta.etag and entry.checked_at >= since:
                fill.verified = True  # verified by its filler before it committed
                fill.notify()
                return True
        return await self._adopt(fill, since)

    async def _until_finished(self, other: Published) -> bool:
        # Polled: the end of another process's fill shows only as its flock going away.
        while True:
            if self._store.finished(other):
                return True
            await asyncio.sleep(_FOLLOW_POLL)

    async def _adopt(self, fill: Fill, since: float) -> bool:
        """After waiting on another worker's fill of the same key, serve what it committed instead of asking S3.

        Only a version S3 confirmed after this fill began counts (as fresh as fetching it now would be);
        otherwise the other fill failed, or committed nothing usable, and this one fetches after all.
        """
        entry = await self._store.lookup(fill.key)
        if entry is None or entry.checked_at < since:
            return False
        if fill.ready.done() and fill.ready.result().etag != entry.meta.etag:
            return False
        staging = await self._store.adopt(entry)
        if staging is None:
            return False
        fill.replace_staging(staging)
        if not fill.ready.done():
            fill.ready.set_result(entry.meta)
        fill.verified = True
        fill.notify()
        return True

    async def _read_part(self, key: str, meta: ObjectMeta, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the version `meta` describes, in a GetObject of their own (If-Match): for a
        reader that fell behind a fill passing through (see store.FellBehind)."""
        part = await self._ask(lambda: self._origin.get(key, span=(start, end - 1), etag=meta.etag))
        try:
            async for chunk in part.chunks(CHUNK_SIZE):
                start += len(chunk)
                if start > end:
                    break
                yield chunk
        finally:
            part.close()
        if start != end:
            raise OriginUnavailable("ranged read shorter or longer than asked")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

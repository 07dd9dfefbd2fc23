"""The disk cache's async front: `CacheStore` runs the synchronous core on its own small executor.

The core is split by job: `index` (entries and body files in diskcache, its only importer), `bodies`
(staging files: write, verify, fsync), `writer` (room for a body, commit, a full disk), `filllocks`
(cross-process single flight, fills followed across workers) and `hot` (this worker's in-memory layer).
Every blocking call runs on the store's executor, never on the event loop, except on the hot path: a hit
found in the in-memory layer costs no executor hop and no SQLite read at all.

Several worker processes may share one directory (workers.py). What they share besides the index: a stamp
that changes after every metadata write (so each worker's in-memory layer knows when to forget), and one
lock file per key being filled, so a cold key is fetched from S3 once, not once per worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from .bodies import FellBehind, Staging, remove_leftovers
from .filllocks import FillLocks, Flight, Published
from .hot import HOT_BODY_MAX, HotLayer, Stamp, held
from .index import EntryIndex
from .models import Entry, HeldBody, ObjectMeta
from .policy import is_fresh
from .writer import WRITE_ERRORS, BodyWriter, Count, room_to_make

__all__ = ["HOT_BODY_MAX", "WRITE_ERRORS", "CacheStore", "Count", "FellBehind", "Flight", "Health", "Published",
           "Staging", "room_to_make"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TOUCH_INTERVAL = 10.0  # seconds between batched access-time write-backs
# A key's access time is written back at most this often: eviction is least-recently-used to within it, which
# for a cache of gigabytes is as good as exact, while renewing every hot key each interval (a SQLite row and
# a re-linked body file each) took 8 % of a worker's CPU under hot hits (benchmarks/results/profile-workers.md).
_RENEW_AFTER = 600.0
# Keys remembered for that, oldest first: only those renewed within it (an older one is renewed at its next hit
# anyway), and at most this many, about 170 bytes each. Every key used to stay until 100,000 were held: 14 MiB
# per worker after a crawler. A key the bound drops early costs one more row in a later batch.
_RENEWED_KEPT = 20_000
Health = Literal["ok", "full", "failed"]


def _uncounted(name: str, amount: int) -> None:
    pass


class CacheStore:
    """lookup / open_body / stage+commit / mark_checked / purge over one cache directory."""

    def __init__(self, directory: str, size_limit: int, *, threads: int = 4, verify_on_read: bool = False,
                 touch_interval: float = _TOUCH_INTERVAL, renew_after: float = _RENEW_AFTER,
                 count: Count = _uncounted, clock: Callable[[], float] = time.monotonic) -> None:
        self._root = Path(directory)
        self._clock = clock  # for renewals and their write-backs
        self._touch_interval = touch_interval
        self._renew_after = renew_after
        # key -> when this worker last queued its access-time write-back, oldest first
        self._renewed: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._verify_on_read = verify_on_read
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache")
        self._index = EntryIndex(self._root / "db", size_limit)
        self._staging_dir = self._root / "staging"
        self._writer = BodyWriter(self._index, self._staging_dir, size_limit, count=count, changed=self._changed,
                                  usable=lambda: self._check_sync() != "failed")
        self._touched: dict[str, str] = {}  # key -> ETag of the body read
        self._touch_flushed = clock()
        self._flushing: Future[None] | None = None
        self._hot = HotLayer()
        self._stamp: Stamp | None = None  # None: no in-memory layer (the cache directory is unusable)
        self._locks = FillLocks(self._root / "locks")
        self._opened = False  # whether the index opened once: then a vanished directory is recreated

    @property
    def write_errors(self) -> int:
        """Bodies this worker could not write to the cache (the shared counter totals every worker)."""
        return self._writer.write_errors

    @property
    def commit_retries(self) -> int:
        """Commits that met another writer's lock and tried again (for tests to wait on; see index.py)."""
        return self._index.commit_retries

    @property
    def available(self) -> bool:
        return self._index.available

    @property
    def health(self) -> Health:
        """"failed": no cache (every request passes through); "full": serving, but new bodies pass through
        uncached until there is room; "ok". `check()` first looks for a vanished directory."""
        if not self._index.available:
            return "failed"
        return "full" if self._writer.full else "ok"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifetime -------------------------------------------------------------------------------------

    def _open_sync(self) -> None:
        try:
            self._staging_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self._staging_dir)
            self._index.open()
            self._opened = True
            try:
                self._stamp = Stamp(self._root / "stamp")
            except (OSError, ValueError) as exc:
                log.warning("no in-memory layer (%s): every hit reads the index", exc.__class__.__name__)
        except Exception as exc:
            # Cache trouble is not an outage: serve straight from S3 and say so.
            log.error("cache directory %s unusable (%s): serving without a cache", self._root,
                      exc.__class__.__name__)

    def _check_sync(self) -> Health:
        """Recreate the layout and a fresh index if the directory vanished under us (`rm -rf cache/*`).

        SQLite keeps using its deleted file, so without this every fill would fail to stage while lookups
        and /stats went on reading the ghost of the old index. Another worker may have recreated it first:
        then this one just opens the new index (sibling workers' files are never touched here).
        """
        if not self._opened or not (self._index.vanished() or not self._staging_dir.is_dir()):
            return self.health
        log.error("cache directory %s vanished or was replaced while running: recreating it", self._root)
        self._index.close()
        try:
            self._staging_dir.mkdir(parents=True, exist_ok=True)
            self._index.open()
            stamp = Stamp(self._root / "stamp")
            # The old stamp stays mapped (the loop may be reading it); a new value makes this worker's
            # in-memory entries, read from the vanished index, stale at once.
            stamp.change()
            self._stamp = stamp
        except Exception as exc:
            log.error("cache directory %s cannot be recreated (%s): serving without a cache", self._root,
                      exc.__class__.__name__)
            self._index.close()
        return self.health

    async def check(self) -> Health:
        """The cache's health, after recreating a vanished directory (for /readyz)."""
        return await self._run(self._check_sync)

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def close(self) -> None:
        await self._wait_flush()
        await self._run(self._index.touch, self._take_touched())
        # The index closes the connection of the thread that closes it (diskcache #133): the executor's.
        await self._run(self._index.close)
        self._executor.shutdown(wait=True)
        if self._stamp is not None:
            self._stamp.close()
            self._stamp = None

    def _changed(self) -> None:
        """After any metadata write: every worker's in-memory entries are now suspect (see hot.Stamp)."""
        stamp = self._stamp
        if stamp is not None:
            with contextlib.suppress(ValueError):  # closed meanwhile (shutdown)
                stamp.change()

    # -- reads ----------------------------------------------------------------------------------------

    def on_memory_dropped(self, listener: Callable[[], None]) -> None:
        """`listener()` whenever this worker drops its in-memory entries (a write anywhere, see hot.Stamp)."""
        self._hot.on_entries_dropped(listener)

    def entry_in_memory(self, key: str) -> Entry | None:
        """The entry as this worker last read it, if no write anywhere has happened since (see hot.Stamp)."""
        if self._stamp is None:
            return None
        self._hot.sync(self._stamp.read())
        return self._hot.entry(key)

    async def lookup(self, key: str) -> Entry | None:
        entry = self.entry_in_memory(key)
        if entry is not None:
            return entry  # no executor hop, no SQLite: the hot path
        stamp = self._hot.stamp
        entry = await self._run(self._index.entry, key)
        if entry is not None and self._stamp is not None:
            self._hot.remember(entry, stamp)
        return entry

    def _open_body_sync(self, entry: Entry) -> BinaryIO | HeldBody | None:
        handle = self._index.body(entry)
        if handle is None:
            return None
        size = os.fstat(handle.fileno()).st_size
        # diskcache never fsyncs, and its own repair accepts a short file (docs/reliability.md §0.5): a body whose
        # size disagrees with S3's is a miss, never served. Same-size damage (bit rot, a zeroed page after
        # power loss) needs the opt-in full MD5 check, which reads the whole file on every hit.
        problem = f"{size} bytes, expected {entry.meta.size}" if size != entry.meta.size else None
        if problem is None and self._verify_on_read and entry.meta.md5 is not None:
            digest = hashlib.md5(usedforsecurity=False)
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
            handle.seek(0)
            problem = None if digest.hexdigest() == entry.meta.md5 else "MD5 mismatch"
        if problem is None and size <= HOT_BODY_MAX:
            with handle:
                data = handle.read()  # read first: a disk error is an OSError here, a SIGBUS in a mapping
                if len(data) == size:
                    return held(handle, data)  # kept in memory by open_body: later hits need no file at all
            problem = f"read {len(data)} bytes, expected {size}"
        if problem is not None:
            handle.close()
            log.error("cached body damaged (%s): dropping it", problem)
            self._forget_sync(entry.key)
            return None
        return handle

    def _note_hit(self, entry: Entry) -> None:
        """Remember the access for eviction; written back in one batch per interval, off the hit's path."""
        now = self._clock()
        renewed = self._renewed.get(entry.key)
        if renewed is None or now - renewed >= self._renew_after:
            self._renewed[entry.key] = now
            self._renewed.move_to_end(entry.key)
            self._touched[entry.key] = entry.meta.etag
            self._forget_renewed(now)
        if self._touched and now - self._touch_flushed >= self._touch_interval and (
                self._flushing is None or self._flushing.done()):
            self._flushing = self._executor.submit(self._index.touch, self._take_touched())

    def _forget_renewed(self, now: float) -> None:
        renewed = self._renewed
        while renewed and (len(renewed) > _RENEWED_KEPT or now - next(iter(renewed.values())) >= self._renew_after):
            renewed.popitem(last=False)

    async def _wait_flush(self) -> None:
        # A write after a hit must not overtake the hit's touch (eviction would pick the entry just read).
        flushing = self._flushing
        if flushing is not None and not flushing.done():
            await asyncio.wrap_future(flushing)

    def _take_touched(self) -> list[tuple[str, str]]:
        """The (key, ETag) bodies read since the last write-back (taken on the loop, where hits note them)."""
        touched, self._touched = self._touched, {}
        self._touch_flushed = self._clock()
        return list(touched.items())

    def fresh_in_memory(self, key: str, ttl: float, now: float) -> tuple[Entry, HeldBody] | None:
        """A fresh entry and its body, both held in this worker's memory: a hit that needs no await."""
        entry = self.entry_in_memory(key)
        if entry is None or not is_fresh(entry, ttl, now):
            return None
        data = self.body_in_memory(entry)
        return None if data is None else (entry, data)

    def body_in_memory(self, entry: Entry, *, hit: bool = True) -> HeldBody | None:
        """A small body this worker already holds (read once from its file, size-checked then); `hit`: as
        open_body's."""
        if entry.meta.size > HOT_BODY_MAX:
            return None
        data = self._hot.body(entry)
        if data is not None and hit:
            self._note_hit(entry)
        return data

    async def open_body(self, entry: Entry, *, hit: bool = True) -> BinaryIO | HeldBody | None:
        """The body: bytes when small (held in memory after the first hit), else an open file to sendfile
        from; None when it is gone or damaged (then: refetch).

        `hit=False` for a read no client asked for (the variant maker's): neither kept in memory nor counted
        as an access. Kept, every object fetched once (a crawler, a link checker) would stay in each worker's
        memory until the budget pushed it out: a 10-minute mixed run grew by the budget (footprint.md).
        """
        data = self.body_in_memory(entry, hit=hit)
        if data is not None:
            return data
        body = await self._run(self._open_body_sync, entry)
        if hit and isinstance(body, HeldBody):
            self._hot.keep_body(entry, body)
        if hit and body is not None:
            self._note_hit(entry)
        return body

    async def close_body(self, handle: BinaryIO | HeldBody) -> None:
        if not isinstance(handle, HeldBody):
            await self._run(handle.close)

    # -- compressed variants (variants.py makes them; index.py files them beside the body) --------------

    def variant_in_memory(self, key: str, etag: str, coding: str) -> HeldBody | None:
        return self._hot.variant(key, etag, coding)

    def _open_variant_sync(self, key: str, etag: str, coding: str) -> BinaryIO | HeldBody | None:
        handle = self._index.variant(key, etag, coding)
        if handle is None:
            return None
        size = os.fstat(handle.fileno()).st_size
        if size > HOT_BODY_MAX:
            return handle
        with handle:
            # As _open_body_sync: read first, so a disk error is an OSError here, not a SIGBUS in a mapping.
            return held(handle, handle.read())

    async def open_variant(self, key: str, etag: str, coding: str) -> BinaryIO | HeldBody | None:
        """A variant: bytes when small (then kept in memory), an open file to sendfile from, or None."""
        data = self._hot.variant(key, etag, coding)
        if data is not None:
            return data
        body = await self._run(self._open_variant_sync, key, etag, coding)
        if isinstance(body, HeldBody):
            self._hot.keep_variant(key, etag, coding, body)
        return body

    def _put_variant_sync(self, key: str, etag: str, coding: str, data: bytes) -> bool:
        fd, path = tempfile.mkstemp(dir=self._staging_dir, prefix=f"{os.getpid()}-", suffix=".variant")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                # Durable before it is indexed, like a body: a torn variant would be served as valid bytes.
                os.fdatasync(out.fileno())
            if self._index.put_variant(key, etag, coding, path, len(data)):
                return True
        except OSError as exc:
            log.warning("compressed variant not stored (%s)", exc.__class__.__name__)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return False

    async def stored_variants(self, key: str, etag: str) -> frozenset[str]:
        """The codings the index holds for (key, ETag), whatever this worker has in memory."""
        return await self._run(self._index.variants, key, etag)

    async def put_variant(self, key: str, etag: str, coding: str, data: bytes) -> bool:
        """Store a variant of (key, ETag); False when that version is no longer the cached one."""
        if not self._index.available:
            return False
        # Not kept in memory here: open_variant keeps it once a client asks for this coding (few clients ask
        # for more than one, and identity-only ones for none).
        return await self._run(self._put_variant_sync, key, etag, coding, data)

    def fill_lock(self, key: str) -> contextlib.AbstractAsyncContextManager[Flight]:
        """Cross-process single-flight for a fill of `key` (see FillLocks); a no-op without a cache."""
        if not self._index.available:
            return contextlib.nullcontext(Flight(waited=False))
        return self._locks.hold(key)

    def publish(self, staging: Staging, *, verified: bool = False) -> None:
        """Tell the other workers where the fill of `staging.key` (whose lock this worker holds) streams to;
        `verified`: its body is complete and verified, only the commit is left."""
        self._locks.publish(staging.key, staging.path, staging.meta, verified=verified)

    async def committing_elsewhere(self, key: str) -> bool:
        """Whether another worker was committing a verified body of `key`, which it now has (FillLocks)."""
        if not self._index.available:
            return False
        return await self._locks.until_committed(key)

    @staticmethod
    def finished(fill: Published) -> bool:
        """Whether another worker's published fill has ended (or its worker died)."""
        return FillLocks.finished(fill)

    def _follow_sync(self, key: str, fill: Published) -> Staging | None:
        if fill.path is None:
            return None
        try:
            fd = os.open(fill.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # committed (renamed) or discarded meanwhile: the index will say which
        return Staging.following(fd, key, fill.meta)

    async def follow(self, key: str, fill: Published) -> Staging | None:
        """Another worker's staging file, to read as it grows; None when there is none (any more)."""
        return await self._run(self._follow_sync, key, fill)

    def _adopt_sync(self, entry: Entry) -> Staging | None:
        handle = self._index.body(entry)
        if handle is None:
            return None
        with handle:
            if os.fstat(handle.fileno()).st_size != entry.meta.size:
                return None
            return Staging.complete(os.dup(handle.fileno()), entry.key, entry.meta)

    async def adopt(self, entry: Entry) -> Staging | None:
        """A committed body as a finished staging file, for a fill that waited on another worker's."""
        return await self._run(self._adopt_sync, entry)

    # -- writes ---------------------------------------------------------------------------------------

    async def stage(self, key: str, meta: ObjectMeta) -> Staging:
        """A staging file with room made for `meta.size` bytes, or a pass-through (see bodies.Staging)."""
        return await self._run(self._writer.stage, key, meta)

    async def write(self, staging: Staging, chunk: bytes) -> None:
        await self._run(self._writer.write, staging, chunk)

    async def flush(self, staging: Staging) -> None:
        """Write what `staging` has received so far (see bodies.Staging.receive, writebehind.py)."""
        await self._run(self._writer.flush, staging)

    async def commit(self, staging: Staging, now: float) -> Entry | None:
        """Index a verified body; None when the cache could not take it (the response goes on regardless)."""
        await self._wait_flush()
        return await self._run(self._writer.commit, staging, now)

    async def discard(self, staging: Staging) -> None:
        await self._run(self._writer.discard, staging)

    def _mark_checked_sync(self, entry: Entry) -> bool:
        written = self._index.put(entry)
        self._changed()
        return written

    async def mark_checked(self, entry: Entry) -> bool:
        """Record a new checked_at (and headers); False when the index could not take it (locked, failing)."""
        return await self._run(self._mark_checked_sync, entry)

    # -- removal --------------------------------------------------------------------------------------

    def _forget_sync(self, key: str) -> int:
        try:
            return self._index.forget(key)
        finally:
            self._changed()

    async def forget(self, key: str) -> int:
        return await self._run(self._forget_sync, key)

    def _purge_prefix_sync(self, prefix: str) -> int:
        try:
            return self._index.purge_prefix(prefix)
        finally:
            self._changed()

    async def purge_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with `prefix` ("" for all); returns how many objects."""
        purged = await self._run(self._purge_prefix_sync, prefix)
        self._hot.forget()  # this worker's bodies too: a purge is also how an operator frees memory
        return purged

    async def keys(self, prefix: str) -> list[str]:
        """Every cached key starting with `prefix` (events.py's sweep: entries whose object was deleted)."""
        return await self._run(self._index.keys, prefix)

    def _stats_sync(self) -> tuple[int, int]:
        self._check_sync()  # never count the entries of a deleted index
        return self._index.stats()

    async def stats(self) -> tuple[int, int]:
        """(rows, bytes on disk)."""
        return await self._run(self._stats_sync)

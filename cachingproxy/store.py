"""The disk cache: metadata per S3 key, bodies per (key, ETag), over one diskcache.Cache.

Bodies are written to a staging file while they stream, verified, then renamed into diskcache's value
directory by a `Disk` subclass, so a body is never copied twice and a half-written file is never indexed.
Every blocking call runs on the store's own small executor, never on the event loop, except on the hot
path: a hit found in the in-memory layer (`_Hot`) costs no executor hop and no SQLite read at all.

Several worker processes may share one directory (workers.py). What they share besides diskcache: a stamp
that changes after every metadata write (so each worker's in-memory layer knows when to forget), and one
lock file per key being filled (`FillLocks`), so a cold key is fetched from S3 once, not once per worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import diskcache

from .models import Entry, ObjectMeta
from .tally import Tally

__all__ = ["HOT_BODY_MAX", "WRITE_ERRORS", "CacheStore", "FillLocks", "Flight", "Staging"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_FORMAT = 1  # bump when the stored metadata layout changes; older records read as misses
# A short SQLite timeout: under contention a lookup becomes a miss instead of pinning a thread for
# diskcache's default 60 s (RELIABILITY.md §0.7).
_SQLITE_TIMEOUT = 0.5
_COMMIT_ATTEMPTS = 3  # a commit waits at most this many SQLite timeouts for another writer
_CACHE_ERRORS = (diskcache.Timeout, sqlite3.Error, OSError)
_TOUCH_INTERVAL = 10.0  # seconds between batched access-time write-backs
WRITE_ERRORS = ("cache_write_errors",)  # this module's tally cell
HOT_BODY_MAX = 64 * 1024  # bodies up to this size are kept in memory once hit: one write(), no file, no hop
HOT_BODY_BUDGET = 16 * 1024 * 1024  # per worker; a docs site's hot pages, CSS and JS fit many times over
HOT_ENTRIES = 50_000  # metadata records per worker (a few hundred bytes each)


@dataclass(frozen=True, slots=True)
class _Staged:
    """A verified staging file that `_StagingDisk.store` moves into place instead of copying."""

    path: str
    size: int


class _StagingDisk(diskcache.Disk):  # type: ignore[misc]
    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, _Staged):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            # Same file system (both live under [cache] directory), so this is an atomic rename.
            os.replace(value.path, full_path)
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key=key)


def _meta_key(key: str) -> tuple[str, str]:
    return ("meta", key)


def _body_key(key: str, etag: str) -> tuple[str, str, str]:
    return ("body", key, etag)


def _encode(entry: Entry) -> dict[str, Any]:
    m = entry.meta
    return {"v": _FORMAT, "key": entry.key, "etag": m.etag, "size": m.size, "lm": m.last_modified,
            "headers": list(m.headers), "enc": m.encrypted, "checked": entry.checked_at, "redirect": m.redirect}


def _decode(raw: Any) -> Entry | None:
    if not isinstance(raw, dict) or raw.get("v") != _FORMAT:
        return None
    meta = ObjectMeta(etag=raw["etag"], size=raw["size"], last_modified=raw["lm"],
                      headers=tuple(tuple(h) for h in raw["headers"]), encrypted=raw["enc"],
                      redirect=raw.get("redirect", ""))
    return Entry(key=raw["key"], meta=meta, checked_at=raw["checked"])


class Staging:
    """One body being written: a file that readers `pread` while it grows, then verified and committed.

    The fd stays valid after the file is renamed into the cache or unlinked, so readers that joined a fill
    keep reading the same bytes whatever happens to the path. If the disk fails mid-body (ENOSPC, EFBIG),
    the rest spills to memory: the readers still get every byte, the body is just never committed.
    """

    @classmethod
    def complete(cls, fd: int, key: str, meta: ObjectMeta) -> Staging:
        """A body another worker already committed, to read from like a finished fill (never committed again)."""
        staging = cls(fd, None, key, meta)
        staging.written = staging._on_disk = meta.size
        return staging

    def __init__(self, fd: int | None, path: str | None, key: str, meta: ObjectMeta) -> None:
        self.fd = fd
        self.key = key
        self.meta = meta
        self.written = 0
        self.path = path  # None: an anonymous file or memory, which can serve readers but never be committed
        self._on_disk = 0
        self._spill: bytearray | None = None if fd is not None else bytearray()
        self._md5 = hashlib.md5(usedforsecurity=False) if meta.md5 else None
        self._closed = False
        # A fill writes in an executor thread while the loop may close the file (a cancelled fill, the last
        # reader leaving): the fd must never be closed, and perhaps reused, under a write.
        self._lock = threading.Lock()

    @property
    def committable(self) -> bool:
        return self.path is not None and self._spill is None

    def write(self, chunk: bytes) -> None:
        """Blocking: call through the store's executor."""
        with self._lock:
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        if self._closed:
            return
        view = memoryview(chunk)
        if self._spill is None and self.fd is not None:
            try:
                while view:
                    n = os.write(self.fd, view)
                    self._on_disk += n
                    view = view[n:]
            except OSError as exc:
                log.warning("cache disk write failed (%s): this body passes through uncached",
                            exc.__class__.__name__)
                self._spill = bytearray()
        if view:
            assert self._spill is not None
            self._spill += view
        if self._md5 is not None:
            self._md5.update(chunk)
        self.written += len(chunk)

    def pread(self, size: int, offset: int) -> bytes:
        if offset < self._on_disk:
            assert self.fd is not None
            return os.pread(self.fd, min(size, self._on_disk - offset), offset)
        assert self._spill is not None
        start = offset - self._on_disk
        return bytes(self._spill[start : start + size])

    def problem(self) -> str | None:
        """Why this body must not be cached, or None when it is complete and intact."""
        if self.written != self.meta.size:
            return f"length {self.written} != Content-Length {self.meta.size}"
        if self._md5 is not None and self._md5.hexdigest() != self.meta.md5:
            return "MD5 does not match the ETag"
        return None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._spill = None
                if self.fd is not None:
                    os.close(self.fd)

    def discard_path(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


class _Stamp:
    """Eight bytes in `<cache>/stamp`, mapped by every worker, given a new random value after each metadata
    write (commit, mark_checked, forget, purge). A worker whose in-memory layer was filled under another
    value forgets it before its next lookup. Reading it is a memory load: no system call on a hit.

    Ordering makes it safe: a lookup reads the stamp before SQLite and files what it read under that
    stamp; a writer changes the stamp after its transaction commits. So a record read before a write is
    always filed under a stamp that the write then replaces (a torn 8-byte read just forgets once more).
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)  # the mapping keeps the file

    def read(self) -> bytes:
        return self._map[:8]

    def change(self) -> None:
        self._map[:8] = os.urandom(8)

    def close(self) -> None:
        self._map.close()


class _Hot:
    """This worker's memory of recent metadata (per key) and small bodies (per key and ETag), both LRU-bounded.

    Entries are only a copy of what SQLite said under the current stamp (see `_Stamp`), so they obey the TTL
    exactly as a lookup would. Bodies need no invalidation: a (key, ETag) body never changes, and one is
    only served for an entry that names that ETag; they were size- (and with verify_on_read, MD5-) checked
    when read from the file.
    """

    def __init__(self) -> None:
        self.stamp = b""
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self.bodies: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()
        self.body_bytes = 0

    def sync(self, stamp: bytes) -> None:
        if stamp != self.stamp:
            self.stamp = stamp
            self.entries.clear()

    def remember(self, entry: Entry, stamp: bytes) -> None:
        if stamp != self.stamp:
            return  # read under an older stamp (a write happened meanwhile): it may be stale already
        self.entries[entry.key] = entry
        if len(self.entries) > HOT_ENTRIES:
            self.entries.popitem(last=False)

    def entry(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def body(self, entry: Entry) -> bytes | None:
        ident = (entry.key, entry.meta.etag)
        data = self.bodies.get(ident)
        if data is not None:
            self.bodies.move_to_end(ident)
        return data

    def keep_body(self, entry: Entry, data: bytes) -> None:
        ident = (entry.key, entry.meta.etag)
        if ident in self.bodies:
            return
        self.bodies[ident] = data
        self.body_bytes += len(data)
        while self.body_bytes > HOT_BODY_BUDGET:
            self.body_bytes -= len(self.bodies.popitem(last=False)[1])

    def forget(self) -> None:
        self.entries.clear()
        self.bodies.clear()
        self.body_bytes = 0


@dataclass(frozen=True, slots=True)
class Flight:
    """How `FillLocks.hold` went: `held` (this fill is the only one), `waited` (another worker was filling:
    look the key up again before fetching)."""

    held: bool
    waited: bool


class FillLocks:
    """One lock file per key being filled, so that N workers fetch a cold key from S3 once, not N times.

    In-process single-flight (service.py) already gives one fill per key per worker; the fill task then
    takes this lock before its GetObject and keeps it until the body is committed. A worker that finds it
    held waits (polling, never blocking a thread), and when it gets it sees `waited=True`: it must look the
    key up again, because the other worker has most likely just committed it. After `timeout` it fetches
    anyway (`held=False`), as nginx's proxy_cache_lock_timeout does, so a slow or stuck fill elsewhere
    costs one duplicate S3 read, never an outage.

    flock(2) locks die with their process, so a crashed worker never leaves a key locked. The holder
    unlinks the file before unlocking, and an acquirer checks that the file it locked is still the one at
    the path (the classic unlink race: otherwise two workers could each hold a different inode), so the
    directory holds only the files of fills in flight. The calls are non-blocking and touch no data, so
    they run on the event loop (a few µs) rather than costing an executor hop per miss.
    """

    def __init__(self, directory: str | os.PathLike[str], *, timeout: float = 10.0, poll: float = 0.005,
                 max_poll: float = 0.05) -> None:
        self._dir = Path(directory)
        self._timeout = timeout
        self._poll = poll
        self._max_poll = max_poll
        self._made = False

    def _path(self, key: str) -> str:
        # Keys never become paths (RELIABILITY.md §2): a digest is fixed-length and has no '/'.
        return str(self._dir / (hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest() + ".lock"))

    def _try_lock(self, path: str) -> tuple[int | None, bool]:
        """(fd holding the lock, or None; whether someone else held it)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None, True
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            # The previous holder unlinked this inode after we opened it: locking it proves nothing.
            os.close(fd)
            return None, False
        return fd, False

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[Flight]:
        """Hold the fill lock for `key` for the body of the `async with` (or give up after the timeout)."""
        path = self._path(key)
        fd: int | None = None
        waited = False
        try:
            if not self._made:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._made = True
            deadline = time.monotonic() + self._timeout
            delay = self._poll
            while True:
                fd, busy = self._try_lock(path)
                waited |= busy
                if fd is not None or time.monotonic() >= deadline:
                    break
                if busy:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_poll)
        except OSError as exc:
            # Cache trouble is not an outage: fetch without the lock (and make the directory again next time).
            self._made = False
            log.warning("fill lock unavailable (%s): fetching without it", exc.__class__.__name__)
        try:
            yield Flight(held=fd is not None, waited=waited)
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # before unlocking: see the class docstring
                os.close(fd)  # closing the last fd releases the flock


class CacheStore:
    """lookup / open_body / stage+commit / mark_checked / purge over one diskcache.Cache."""

    def __init__(self, directory: str, size_limit: int, *, threads: int = 4, verify_on_read: bool = False,
                 touch_interval: float = _TOUCH_INTERVAL, tally: Tally | None = None) -> None:
        self._root = Path(directory)
        self._touch_interval = touch_interval
        self._verify_on_read = verify_on_read
        self._size_limit = size_limit
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache")
        self._cache: diskcache.Cache | None = None
        self._staging_dir = self._root / "staging"
        # Counted in the shared tally so /stats totals every worker (tally.py).
        self._tally = tally if tally is not None else Tally(WRITE_ERRORS)
        self._touched: dict[str, str] = {}  # key -> ETag of the body read
        self._touch_flushed = time.monotonic()
        self._flushing: Future[None] | None = None
        self._hot = _Hot()
        self._stamp: _Stamp | None = None  # None: no in-memory layer (the cache directory is unusable)
        self._locks = FillLocks(self._root / "locks")
        # Commits that met another writer's lock and tried again: lets a test wait until a retry has
        # happened rather than hold the lock for a guessed time. Bumped from executor threads without a lock:
        # exact for one commit at a time, which is all a test relies on.
        self.commit_retries = 0

    @property
    def write_errors(self) -> int:
        """Bodies this worker could not write to the cache (the tally's totals give all workers)."""
        return self._tally.get(WRITE_ERRORS[0])

    @property
    def available(self) -> bool:
        return self._cache is not None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifetime -------------------------------------------------------------------------------------

    def _open_db(self) -> diskcache.Cache:
        cache = diskcache.Cache(
            str(self._root / "db"),
            size_limit=self._size_limit,
            # Not "least-recently-used": that turns every read into a write transaction (RELIABILITY.md §0.7),
            # which serialises hits and times out under load. Hits are recorded in memory and written back
            # as store_time in one batched transaction (_flush_keys), which approximates LRU to within
            # _TOUCH_INTERVAL and keeps every hit read-only.
            eviction_policy="least-recently-stored",
            timeout=_SQLITE_TIMEOUT,
            disk=_StagingDisk,
        )
        try:
            cache.get(_meta_key(""))  # a garbage file can open fine and fail on first use
        except BaseException:
            cache.close()
            raise
        return cache

    def _open_sync(self) -> None:
        try:
            self._staging_dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            try:
                self._cache = self._open_db()
            except sqlite3.DatabaseError as exc:
                # "file is not a database" / "malformed" (diskcache #67, #164): keep the evidence, start empty.
                aside = self._root / f"db.corrupt-{int(time.time())}"
                log.error("cache index unreadable (%s): moved aside to %s, starting empty", exc, aside)
                os.replace(self._root / "db", aside)
                self._cache = self._open_db()
            try:
                self._stamp = _Stamp(self._root / "stamp")
            except (OSError, ValueError) as exc:
                log.warning("no in-memory layer (%s): every hit reads the index", exc.__class__.__name__)
        except Exception as exc:
            # Cache trouble is not an outage: serve straight from S3 and say so.
            log.error("cache directory %s unusable (%s): serving without a cache", self._root,
                      exc.__class__.__name__)
            self._cache = None

    def _remove_leftovers(self) -> None:
        """Staging files left by a crash were never indexed: remove them (RELIABILITY.md §0.5).

        Files are named after the worker that writes them, because sibling workers share this directory and
        a restarting worker must not delete their fills in flight. Our own pid's files are leftovers too
        (pid reuse: pid 1 in every container run).
        """
        me = os.getpid()
        for leftover in self._staging_dir.iterdir():
            owner = leftover.name.partition("-")[0]
            if owner.isdigit() and int(owner) != me and _alive(int(owner)):
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def close(self) -> None:
        await self._wait_flush()
        await self._run(self._flush_keys, self._take_touched())
        cache, self._cache = self._cache, None
        if cache is not None:
            # diskcache keeps one connection per thread (#133): closing from the executor closes the one
            # the executor used; the rest die with their threads.
            await self._run(cache.close)
        self._executor.shutdown(wait=True)
        if self._stamp is not None:
            self._stamp.close()
            self._stamp = None

    def _changed(self) -> None:
        """After any metadata write: every worker's in-memory entries are now suspect (see _Stamp)."""
        stamp = self._stamp
        if stamp is not None:
            with contextlib.suppress(ValueError):  # closed meanwhile (shutdown)
                stamp.change()

    # -- reads ----------------------------------------------------------------------------------------

    def _guard(self, fn: Callable[[diskcache.Cache], T], default: T) -> T:
        cache = self._cache
        if cache is None:
            return default
        try:
            return fn(cache)
        except _CACHE_ERRORS as exc:
            log.warning("cache operation failed (%s): treating as a miss", exc.__class__.__name__)
            return default

    def _lookup_sync(self, key: str) -> Entry | None:
        return _decode(self._guard(lambda c: c.get(_meta_key(key)), None))

    def entry_in_memory(self, key: str) -> Entry | None:
        """The entry as this worker last read it, if no write anywhere has happened since (see `_Stamp`)."""
        if self._stamp is None:
            return None
        self._hot.sync(self._stamp.read())
        return self._hot.entry(key)

    async def lookup(self, key: str) -> Entry | None:
        entry = self.entry_in_memory(key)
        if entry is not None:
            return entry  # no executor hop, no SQLite: the hot path
        stamp = self._hot.stamp
        entry = await self._run(self._lookup_sync, key)
        if entry is not None and self._stamp is not None:
            self._hot.remember(entry, stamp)
        return entry

    def _open_body_sync(self, entry: Entry) -> BinaryIO | bytes | None:
        handle: BinaryIO | None = self._guard(
            lambda c: c.get(_body_key(entry.key, entry.meta.etag), read=True), None)
        if handle is None:
            return None
        size = os.fstat(handle.fileno()).st_size
        # diskcache never fsyncs, and its own repair accepts a short file (RELIABILITY.md §0.5): a body whose
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
                data = handle.read()
            if len(data) == size:
                return data  # kept in memory by open_body: later hits need no file at all
            problem = f"read {len(data)} bytes, expected {size}"
        if problem is not None:
            handle.close()
            log.error("cached body damaged (%s): dropping it", problem)
            self._forget_sync(entry.key)
            return None
        return handle

    def _note_hit(self, entry: Entry) -> None:
        """Remember the access for eviction; written back in one batch per interval, off the hit's path."""
        self._touched[entry.key] = entry.meta.etag
        if time.monotonic() - self._touch_flushed >= self._touch_interval and (
                self._flushing is None or self._flushing.done()):
            self._flushing = self._executor.submit(self._flush_keys, self._take_touched())

    async def _wait_flush(self) -> None:
        # A write after a hit must not overtake the hit's touch (eviction would pick the entry just read).
        flushing = self._flushing
        if flushing is not None and not flushing.done():
            await asyncio.wrap_future(flushing)

    def _take_touched(self) -> list[tuple[str, ...]]:
        """The cache keys read since the last write-back (taken on the loop, where hits note them)."""
        touched, self._touched = self._touched, {}
        self._touch_flushed = time.monotonic()
        return [k for key, etag in touched.items() for k in (_meta_key(key), _body_key(key, etag))]

    def _flush_keys(self, keys: list[tuple[str, ...]]) -> None:
        now = time.time()

        def touch(cache: diskcache.Cache) -> None:
            # diskcache has no public "touch store_time"; this is the one UPDATE its own LRU policy would run
            # on each get, batched (the Cache table layout is pinned with diskcache==5.6.3).
            with cache.transact():
                for key in keys:
                    db_key, raw = cache._disk.put(key)
                    cache._sql("UPDATE Cache SET store_time = ? WHERE key = ? AND raw = ?", (now, db_key, raw))

        if keys:
            self._guard(touch, None)

    def body_in_memory(self, entry: Entry) -> bytes | None:
        """A small body this worker already holds (read once from its file, size-checked then)."""
        if entry.meta.size > HOT_BODY_MAX:
            return None
        data = self._hot.body(entry)
        if data is not None:
            self._note_hit(entry)
        return data

    async def open_body(self, entry: Entry) -> BinaryIO | bytes | None:
        """The body: bytes when small (held in memory after the first hit), else an open file to sendfile
        from; None when it is gone or damaged (then: refetch)."""
        data = self.body_in_memory(entry)
        if data is not None:
            return data
        body = await self._run(self._open_body_sync, entry)
        if isinstance(body, bytes):
            self._hot.keep_body(entry, body)
        if body is not None:
            self._note_hit(entry)
        return body

    async def close_body(self, handle: BinaryIO | bytes) -> None:
        if not isinstance(handle, bytes):
            await self._run(handle.close)

    def fill_lock(self, key: str) -> contextlib.AbstractAsyncContextManager[Flight]:
        """Cross-process single-flight for a fill of `key` (see FillLocks); a no-op without a cache."""
        if self._cache is None:
            return contextlib.nullcontext(Flight(held=False, waited=False))
        return self._locks.hold(key)

    def _adopt_sync(self, entry: Entry) -> Staging | None:
        handle = self._guard(lambda c: c.get(_body_key(entry.key, entry.meta.etag), read=True), None)
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

    def _stage_sync(self, key: str, meta: ObjectMeta) -> Staging:
        if self._cache is not None:
            try:
                fd, path = tempfile.mkstemp(dir=self._staging_dir, prefix=f"{os.getpid()}-", suffix=".part")
                return Staging(fd, path, key, meta)
            except OSError as exc:
                self._tally.add(WRITE_ERRORS[0])
                log.warning("cannot stage a body (%s): passing through", exc.__class__.__name__)
        # Waiters still share one S3 read through an anonymous file (or memory); it is never committed.
        try:
            with tempfile.TemporaryFile() as handle:
                return Staging(os.dup(handle.fileno()), None, key, meta)
        except OSError:
            return Staging(None, None, key, meta)

    async def stage(self, key: str, meta: ObjectMeta) -> Staging:
        return await self._run(self._stage_sync, key, meta)

    async def write(self, staging: Staging, chunk: bytes) -> None:
        await self._run(staging.write, chunk)

    async def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read a cached file without touching its offset, so readers never disturb each other."""
        return await self._run(os.pread, fd, size, offset)

    async def read_staging(self, staging: Staging, size: int, offset: int) -> bytes:
        return await self._run(staging.pread, size, offset)

    def _commit_sync(self, staging: Staging, now: float) -> Entry | None:
        entry = Entry(key=staging.key, meta=staging.meta, checked_at=now)
        cache, path = self._cache, staging.path
        if cache is None or path is None or not staging.committable:
            if staging.path is not None:
                self._tally.add(WRITE_ERRORS[0])
            staging.discard_path()
            return None
        try:
            old = _decode(cache.get(_meta_key(staging.key)))
            for attempt in range(1, _COMMIT_ATTEMPTS + 1):
                try:
                    # BEGIN IMMEDIATE is where another writer makes us time out, before the file moves, so a
                    # verified body is worth another try rather than a refetch from S3 later.
                    with cache.transact():
                        cache.set(_body_key(staging.key, staging.meta.etag), _Staged(path, staging.written),
                                  read=True)
                        cache.set(_meta_key(staging.key), _encode(entry))
                    break
                except diskcache.Timeout:
                    if attempt == _COMMIT_ATTEMPTS or not os.path.exists(path):
                        raise
                    self.commit_retries += 1
            staging.path = None
            if old is not None and old.meta.etag != staging.meta.etag:
                cache.delete(_body_key(staging.key, old.meta.etag))
            self._changed()
        except _CACHE_ERRORS as exc:
            self._tally.add(WRITE_ERRORS[0])
            log.warning("cache write failed (%s): served without caching", exc.__class__.__name__)
            staging.discard_path()
            return None
        return entry

    async def commit(self, staging: Staging, now: float) -> Entry | None:
        """Index a verified body; None when the cache could not take it (the response goes on regardless)."""
        await self._wait_flush()
        return await self._run(self._commit_sync, staging, now)

    async def discard(self, staging: Staging) -> None:
        await self._run(staging.discard_path)

    async def close_staging(self, staging: Staging) -> None:
        await self._run(staging.close)

    def _mark_checked_sync(self, entry: Entry) -> None:
        self._guard(lambda c: c.set(_meta_key(entry.key), _encode(entry)), None)
        self._changed()

    async def mark_checked(self, entry: Entry) -> None:
        await self._run(self._mark_checked_sync, entry)

    # -- removal --------------------------------------------------------------------------------------

    def _forget_sync(self, key: str) -> int:
        def drop(cache: diskcache.Cache) -> int:
            entry = _decode(cache.pop(_meta_key(key), default=None))
            if entry is None:
                return 0
            cache.delete(_body_key(key, entry.meta.etag))
            return 1
        try:
            return self._guard(drop, 0)
        finally:
            self._changed()

    async def forget(self, key: str) -> int:
        return await self._run(self._forget_sync, key)

    def _purge_prefix_sync(self, prefix: str) -> int:
        def drop(cache: diskcache.Cache) -> int:
            doomed = [k for k in cache.iterkeys() if isinstance(k, tuple) and k[1].startswith(prefix)]
            for k in doomed:
                cache.delete(k)
            return sum(1 for k in doomed if k[0] == "meta")
        try:
            return self._guard(drop, 0)
        finally:
            self._changed()

    async def purge_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with `prefix` ("" for all); returns how many objects."""
        purged = await self._run(self._purge_prefix_sync, prefix)
        self._hot.forget()  # this worker's bodies too: a purge is also how an operator frees memory
        return purged

    def _stats_sync(self) -> tuple[int, int]:
        return self._guard(lambda c: (len(c) , c.volume()), (0, 0))

    async def stats(self) -> tuple[int, int]:
        """(rows, bytes on disk)."""
        return await self._run(self._stats_sync)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not one of our workers, but not provably dead either
    try:
        # A killed worker whose new parent has not reaped it yet is a zombie: dead, though kill() finds it.
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True

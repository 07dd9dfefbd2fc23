"""The disk cache: metadata per S3 key, bodies per (key, ETag), over one diskcache.Cache.

Bodies are written to a staging file while they stream, verified, then renamed into diskcache's value
directory by a `Disk` subclass, so a body is never copied twice and a half-written file is never indexed.
Every blocking call runs on the store's own small executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import diskcache

from .models import Entry, ObjectMeta

__all__ = ["CacheStore", "Staging"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_FORMAT = 1  # bump when the stored metadata layout changes; older records read as misses
# A short SQLite timeout: under contention a lookup becomes a miss instead of pinning a thread for
# diskcache's default 60 s (RELIABILITY.md §0.7).
_SQLITE_TIMEOUT = 0.5
_CACHE_ERRORS = (diskcache.Timeout, sqlite3.Error, OSError)
_TOUCH_INTERVAL = 10.0  # seconds between batched access-time write-backs


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
            "headers": list(m.headers), "enc": m.encrypted, "checked": entry.checked_at}


def _decode(raw: Any) -> Entry | None:
    if not isinstance(raw, dict) or raw.get("v") != _FORMAT:
        return None
    meta = ObjectMeta(etag=raw["etag"], size=raw["size"], last_modified=raw["lm"],
                      headers=tuple(tuple(h) for h in raw["headers"]), encrypted=raw["enc"])
    return Entry(key=raw["key"], meta=meta, checked_at=raw["checked"])


class Staging:
    """One body being written: a file that readers `pread` while it grows, then verified and committed.

    The fd stays valid after the file is renamed into the cache or unlinked, so readers that joined a fill
    keep reading the same bytes whatever happens to the path. If the disk fails mid-body (ENOSPC, EFBIG),
    the rest spills to memory: the readers still get every byte, the body is just never committed.
    """

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

    @property
    def committable(self) -> bool:
        return self.path is not None and self._spill is None

    def write(self, chunk: bytes) -> None:
        """Blocking: call through the store's executor."""
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


class CacheStore:
    """lookup / open_body / stage+commit / mark_checked / purge over one diskcache.Cache."""

    def __init__(self, directory: str, size_limit: int, *, threads: int = 4, verify_on_read: bool = False,
                 touch_interval: float = _TOUCH_INTERVAL) -> None:
        self._root = Path(directory)
        self._touch_interval = touch_interval
        self._verify_on_read = verify_on_read
        self._size_limit = size_limit
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache")
        self._cache: diskcache.Cache | None = None
        self._staging_dir = self._root / "staging"
        self.write_errors = 0
        self._touched: set[tuple[str, ...]] = set()
        self._touch_flushed = time.monotonic()

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
            # as store_time in one batched transaction (_flush_touches), which approximates LRU to within
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
            # Staging files left by a crash were never indexed: remove them (RELIABILITY.md §0.5).
            shutil.rmtree(self._staging_dir, ignore_errors=True)
            self._staging_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._cache = self._open_db()
            except sqlite3.DatabaseError as exc:
                # "file is not a database" / "malformed" (diskcache #67, #164): keep the evidence, start empty.
                aside = self._root / f"db.corrupt-{int(time.time())}"
                log.error("cache index unreadable (%s): moved aside to %s, starting empty", exc, aside)
                os.replace(self._root / "db", aside)
                self._cache = self._open_db()
        except Exception as exc:
            # Cache trouble is not an outage: serve straight from S3 and say so.
            log.error("cache directory %s unusable (%s): serving without a cache", self._root,
                      exc.__class__.__name__)
            self._cache = None

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def close(self) -> None:
        await self._run(self._flush_touches)
        cache, self._cache = self._cache, None
        if cache is not None:
            # diskcache keeps one connection per thread (#133): closing from the executor closes the one
            # the executor used; the rest die with their threads.
            await self._run(cache.close)
        self._executor.shutdown(wait=True)

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

    async def lookup(self, key: str) -> Entry | None:
        return await self._run(self._lookup_sync, key)

    def _open_body_sync(self, entry: Entry) -> BinaryIO | None:
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
        if problem is not None:
            handle.close()
            log.error("cached body damaged (%s): dropping it", problem)
            self._forget_sync(entry.key)
            return None
        self._touched.update((_meta_key(entry.key), _body_key(entry.key, entry.meta.etag)))
        if time.monotonic() - self._touch_flushed >= self._touch_interval:
            self._flush_touches()
        return handle

    def _flush_touches(self) -> None:
        keys, self._touched = self._touched, set()
        self._touch_flushed = time.monotonic()
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

    async def open_body(self, entry: Entry) -> BinaryIO | None:
        """An open handle on the body, or None when it is gone or damaged (then: refetch)."""
        return await self._run(self._open_body_sync, entry)

    async def close_body(self, handle: BinaryIO) -> None:
        await self._run(handle.close)

    # -- writes ---------------------------------------------------------------------------------------

    def _stage_sync(self, key: str, meta: ObjectMeta) -> Staging:
        if self._cache is not None:
            try:
                fd, path = tempfile.mkstemp(dir=self._staging_dir, suffix=".part")
                return Staging(fd, path, key, meta)
            except OSError as exc:
                self.write_errors += 1
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
                self.write_errors += 1
            staging.discard_path()
            return None
        try:
            old = _decode(cache.get(_meta_key(staging.key)))
            with cache.transact():
                cache.set(_body_key(staging.key, staging.meta.etag), _Staged(path, staging.written), read=True)
                cache.set(_meta_key(staging.key), _encode(entry))
            staging.path = None
            if old is not None and old.meta.etag != staging.meta.etag:
                cache.delete(_body_key(staging.key, old.meta.etag))
        except _CACHE_ERRORS as exc:
            self.write_errors += 1
            log.warning("cache write failed (%s): served without caching", exc.__class__.__name__)
            staging.discard_path()
        return entry

    async def commit(self, staging: Staging, now: float) -> Entry | None:
        """Index a verified body; None when the cache could not take it (the response goes on regardless)."""
        return await self._run(self._commit_sync, staging, now)

    async def discard(self, staging: Staging) -> None:
        await self._run(staging.discard_path)

    async def close_staging(self, staging: Staging) -> None:
        await self._run(staging.close)

    def _mark_checked_sync(self, entry: Entry) -> None:
        self._guard(lambda c: c.set(_meta_key(entry.key), _encode(entry)), None)

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
        return self._guard(drop, 0)

    async def forget(self, key: str) -> int:
        return await self._run(self._forget_sync, key)

    def _purge_prefix_sync(self, prefix: str) -> int:
        def drop(cache: diskcache.Cache) -> int:
            doomed = [k for k in cache.iterkeys() if isinstance(k, tuple) and k[1].startswith(prefix)]
            for k in doomed:
                cache.delete(k)
            return sum(1 for k in doomed if k[0] == "meta")
        return self._guard(drop, 0)

    async def purge_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with `prefix` ("" for all); returns how many objects."""
        return await self._run(self._purge_prefix_sync, prefix)

    def _stats_sync(self) -> tuple[int, int]:
        return self._guard(lambda c: (len(c) , c.volume()), (0, 0))

    async def stats(self) -> tuple[int, int]:
        """(rows, bytes on disk)."""
        return await self._run(self._stats_sync)

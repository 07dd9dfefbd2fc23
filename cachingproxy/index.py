"""The entry index: metadata per S3 key and bodies per (key, ETag), over one diskcache.Cache.

The only importer of diskcache. Everything here blocks: the async front (store.py) runs it on its own
executor. Only diskcache's public API is used, and one SQL count of its table by tag (`_count_variants`:
diskcache has no call for it); where we rely on a documented behaviour that is not obvious from a method's
name, the comment says which, and tests/test_index.py checks it against the pinned version.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import diskcache

from .models import Entry, ObjectMeta

__all__ = ["INDEX_ERRORS", "EntryIndex"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_FORMAT = 1  # bump when the stored metadata layout changes; older records read as misses
# A short SQLite timeout: under contention a lookup becomes a miss instead of pinning a thread for
# diskcache's default 60 s (docs/reliability.md §0.7).
_SQLITE_TIMEOUT = 0.5
# SQLite's private page cache, per connection: diskcache's default is 8192 pages (32 MiB), a worker has a
# connection per store thread, and each cache grows with the index up to that bound. 512 pages (2 MiB) hold a
# docs site's metadata many times over.
_SQLITE_CACHE_PAGES = 512
# No memory-mapped reads (diskcache maps up to 64 MiB by default): each page a scan or a crawl touched stayed
# resident in every worker that read it, so a worker's memory grew with the cache, not with its traffic. Reads
# through the page cache above cost the same per lookup (7-9 us either way, 20,000 entries; with another
# connection writing between reads 17 us against 23-27 us mapped: benchmarks/results/footprint.md).
_SQLITE_MMAP_BYTES = 0
# Compressed variants are rows like entries and bodies, but not objects: the first item of their keys, and their
# tag (indexed), so that /stats and /metrics count them with one SQL count instead of reading every key (14 s for
# 100k objects).
_VARIANT = "variant"
# In the index's directory once variants stored before they were tagged are gone (`_drop_untagged_variants`).
_VARIANTS_TAGGED = "variants-tagged"
_COMMIT_ATTEMPTS = 3  # a commit waits at most this many SQLite timeouts for another writer
INDEX_ERRORS = (diskcache.Timeout, sqlite3.Error, OSError)


@dataclass(frozen=True, slots=True)
class _Staged:
    """A verified staging file that `_StagingDisk.store` moves into place instead of copying."""

    path: str
    size: int


@dataclass(frozen=True, slots=True)
class _Relinked:
    """A body already in the cache, given a second name so that `set` can re-store it without a copy."""

    path: str
    size: int


class _StagingDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's documented extension point (tutorial, "Disk"): how a value becomes a file.

    `filename()` is Disk's public method for a new value file's name; `store()` returns the
    (size, mode, filename, db_value) tuple its docstring specifies.
    """

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, _Staged | _Relinked):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            if isinstance(value, _Staged):
                # Same file system (both live under [cache] directory), so this is an atomic rename.
                os.replace(value.path, full_path)
            else:
                os.link(value.path, full_path)  # `set` removes the old name once its transaction commits
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key=key)


def _meta_key(key: str) -> tuple[str, str]:
    return ("meta", key)


def _body_key(key: str, etag: str) -> tuple[str, str, str]:
    return ("body", key, etag)


def _variant_key(key: str, etag: str, coding: str) -> tuple[str, str, str, str]:
    # k[1] is the object's key, as for "meta" and "body": purge_prefix drops variants with their object.
    return (_VARIANT, key, etag, coding)


_CODINGS = ("br", "zstd", "gzip")  # encoding.CODINGS; the index imports nothing of ours but models


def _count_variants(cache: diskcache.Cache) -> int:
    # `_sql` is diskcache's own statement runner on this thread's connection; `Cache` and `tag` are its table and
    # column (diskcache 5.6.3, pinned; tests/test_index.py checks the count). The tag index makes it a count of
    # index entries, not a read of every row.
    (count,) = cache._sql("SELECT COUNT(*) FROM Cache WHERE tag = ?", (_VARIANT,)).fetchone()
    return int(count)


def _drop_variants(cache: diskcache.Cache, key: str, etag: str) -> None:
    for coding in _CODINGS:
        cache.delete(_variant_key(key, etag, coding))


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


class EntryIndex:
    """Entries and their body files in `<directory>`; a read that fails is a miss, never an error."""

    def __init__(self, directory: Path, size_limit: int) -> None:
        self._directory = directory
        self._size_limit = size_limit
        self._cache: diskcache.Cache | None = None
        self._culler: diskcache.Cache | None = None  # see `evict_to`
        self._culling = threading.Lock()
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the SQLite file we opened
        # Commits that met another writer's lock and tried again: lets a test wait until a retry has
        # happened rather than hold the lock for a guessed time. Bumped from executor threads without a lock:
        # exact for one commit at a time, which is all a test relies on.
        self.commit_retries = 0
        self.renewed = 0  # entries whose store time `touch` renewed (tests)
        self.scans = 0  # reads of every key (keys, purge_prefix): tests count them

    @property
    def available(self) -> bool:
        return self._cache is not None

    def _open_db(self) -> diskcache.Cache:
        cache = diskcache.Cache(
            str(self._directory),
            size_limit=self._size_limit,
            # Not "least-recently-used": that turns every read into a write transaction (docs/reliability.md §0.7),
            # which serialises hits and times out under load. Hits are recorded in memory and written back
            # in one batched transaction (`touch`), which approximates LRU to within the batch interval and
            # keeps every hit read-only.
            eviction_policy="least-recently-stored",
            timeout=_SQLITE_TIMEOUT,
            disk=_StagingDisk,
            sqlite_cache_size=_SQLITE_CACHE_PAGES,
            sqlite_mmap_size=_SQLITE_MMAP_BYTES,
            tag_index=True,  # for _count_variants
        )
        try:
            cache.get(_meta_key(""))  # a garbage file can open fine and fail on first use
        except BaseException:
            cache.close()
            raise
        return cache

    def open(self) -> None:
        """Open the index, moving an unreadable one aside; raises when the directory cannot hold one at all."""
        try:
            cache = self._open_db()
        except sqlite3.DatabaseError as exc:
            # "file is not a database" / "malformed" (diskcache #67, #164): keep the evidence, start empty.
            aside = self._directory.with_name(f"{self._directory.name}.corrupt-{int(time.time())}")
            log.error("cache index unreadable (%s): moved aside to %s, starting empty", exc, aside)
            os.replace(self._directory, aside)
            cache = self._open_db()
        try:
            self._culler = self._open_db()
            self._identity = self._file_identity()
            self._drop_untagged_variants(cache)
        except BaseException:
            cache.close()
            raise
        self._cache = cache

    def _drop_untagged_variants(self, cache: diskcache.Cache) -> None:
        """Once per index: drop the variants stored before they were tagged, which stats would count as
        objects. They are made again, from their body, when a client asks for that coding. Each worker may
        do it at the first start after an upgrade (one read of every key); a failure only leaves the count
        high until the next start, so it never stops the cache from opening."""
        marker = self._directory / _VARIANTS_TAGGED
        if marker.exists():
            return
        try:
            dropped = sum(1 for k in list(cache.iterkeys())
                          if isinstance(k, tuple) and k[0] == _VARIANT and cache.delete(k))
            marker.touch()
        except INDEX_ERRORS as exc:
            log.warning("could not drop the compressed variants stored by an earlier version (%s): /stats counts "
                        "them as objects until the next start", exc.__class__.__name__)
            return
        if dropped:
            log.info("dropped %d compressed variants stored by an earlier version: each is made again when a "
                     "client asks for it", dropped)

    def _file_identity(self) -> tuple[int, int]:
        # diskcache keeps its index in `<directory>/cache.db` (diskcache.core.DBNAME, the file its docs
        # describe as the SQLite database).
        st = os.stat(self._directory / diskcache.core.DBNAME)
        return st.st_dev, st.st_ino

    def vanished(self) -> bool:
        """Whether the index file we opened is no longer the one at its path (deleted, or replaced by another
        worker's recovery). SQLite goes on using a deleted file, so nothing else would tell us."""
        if self._identity is None:
            return False
        try:
            return self._file_identity() != self._identity
        except OSError:
            return True

    def close(self) -> None:
        cache, self._cache = self._cache, None
        culler, self._culler = self._culler, None
        self._identity = None
        for each in (cache, culler):
            if each is not None:
                # diskcache keeps one connection per thread (#133): this closes the calling thread's; the
                # rest die with their threads.
                each.close()

    def _guard(self, fn: Callable[[diskcache.Cache], T], default: T) -> T:
        cache = self._cache
        if cache is None:
            return default
        try:
            return fn(cache)
        except INDEX_ERRORS as exc:
            log.warning("cache operation failed (%s): treating as a miss", exc.__class__.__name__)
            return default

    # -- reads ----------------------------------------------------------------------------------------

    def entry(self, key: str) -> Entry | None:
        return _decode(self._guard(lambda c: c.get(_meta_key(key)), None))

    def body(self, entry: Entry) -> BinaryIO | None:
        """An open handle on the body file, or None when it is gone."""
        def get(cache: diskcache.Cache) -> BinaryIO | None:
            ident = _body_key(entry.key, entry.meta.etag)
            # `get(read=True)` returns the default when the file vanished between its SELECT and its open
            # (a concurrent `touch` renamed it): one more try reads the new row.
            handle: BinaryIO | None = cache.get(ident, read=True)
            return handle if handle is not None else cache.get(ident, read=True)
        return self._guard(get, None)

    def stats(self) -> tuple[int, int]:
        """(rows of entries and bodies, bytes on disk with variants): diskcache's row count less the tagged
        variants, without reading every key (a dashboard asks every few seconds)."""
        return self._guard(lambda c: (max(0, len(c) - _count_variants(c)), int(c.volume())), (0, 0))

    def volume(self) -> int:
        """Bytes on disk (bodies, variants and the SQLite file): diskcache keeps the total in its Settings
        table, so this is one read, whatever the size of the index. What a fill needs to make room."""
        return self._guard(lambda c: int(c.volume()), 0)

    # -- writes ---------------------------------------------------------------------------------------

    def commit(self, entry: Entry, path: str, size: int) -> None:
        """Index a verified body file (moved, not copied) and its entry in one transaction.

        Raises INDEX_ERRORS; then the file at `path` may or may not still be there.
        """
        cache = self._cache
        if cache is None:
            raise OSError("no cache index")
        old = _decode(cache.get(_meta_key(entry.key)))
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                # BEGIN IMMEDIATE is where another writer makes us time out, before the file moves, so a
                # verified body is worth another try rather than a refetch from S3 later.
                with cache.transact():
                    cache.set(_body_key(entry.key, entry.meta.etag), _Staged(path, size), read=True)
                    cache.set(_meta_key(entry.key), _encode(entry))
                break
            except diskcache.Timeout:
                if attempt == _COMMIT_ATTEMPTS or not os.path.exists(path):
                    raise
                self.commit_retries += 1
        if old is not None and old.meta.etag != entry.meta.etag:
            cache.delete(_body_key(entry.key, old.meta.etag))
            _drop_variants(cache, entry.key, old.meta.etag)  # compressed from the old version: wrong now

    def variant(self, key: str, etag: str, coding: str) -> BinaryIO | None:
        """An open handle on a compressed variant of (key, ETag), or None."""
        def get(cache: diskcache.Cache) -> BinaryIO | None:
            handle: BinaryIO | None = cache.get(_variant_key(key, etag, coding), read=True)
            return handle
        return self._guard(get, None)

    def variants(self, key: str, etag: str) -> frozenset[str]:
        """The codings stored for (key, ETag)."""
        return self._guard(lambda c: frozenset(k for k in _CODINGS if _variant_key(key, etag, k) in c), frozenset())

    def put_variant(self, key: str, etag: str, coding: str, path: str, size: int) -> bool:
        """Index a variant file (moved, not copied) if `etag` is still the entry's version; False otherwise
        (replaced or purged while it was being compressed: then the file is the caller's to remove)."""
        def put(cache: diskcache.Cache) -> bool:
            with cache.transact():
                entry = _decode(cache.get(_meta_key(key)))
                if entry is None or entry.meta.etag != etag:
                    return False
                cache.set(_variant_key(key, etag, coding), _Staged(path, size), read=True, tag=_VARIANT)
                return True
        return self._guard(put, False)

    def put(self, entry: Entry) -> bool:
        """Replace an entry's metadata (a revalidation); its body is unchanged. False when it could not."""
        return self._guard(lambda c: bool(c.set(_meta_key(entry.key), _encode(entry))), False)

    def touch(self, read: Iterable[tuple[str, str]]) -> None:
        """Record that these (key, ETag) bodies were read, for eviction.

        Eviction is "least-recently-stored", and `set` is the public call that renews a row's store time.
        So the entry is set again as it is, and the body is set again under a second hard link to its file
        (`_Relinked`): no copy, and `set` removes the old name after its commit, as it does for any
        replaced value. Readers holding the old file keep reading it (POSIX unlink semantics).
        """
        def renew(cache: diskcache.Cache) -> None:
            with cache.transact():
                for key, etag in read:
                    raw = cache.get(_meta_key(key))
                    entry = _decode(raw)
                    if entry is None or entry.meta.etag != etag:
                        continue  # replaced or removed since it was read: nothing to renew
                    cache.set(_meta_key(key), raw)
                    self.renewed += 1
                    handle = cache.get(_body_key(key, etag), read=True)
                    if handle is not None:
                        with handle:
                            # `get(read=True)` opens the value file by its path (Disk.fetch), so `name` is it.
                            relinked = _Relinked(handle.name, os.fstat(handle.fileno()).st_size)
                        cache.set(_body_key(key, etag), relinked, read=True)
        self._guard(renew, None)

    # -- removal --------------------------------------------------------------------------------------

    def evict_to(self, volume: int) -> None:
        """Evict least-recently-stored (so least recently read, see `touch`) entries until the index holds at
        most `volume` bytes: room for a body whose size is known before it is written.

        `Cache.cull()` culls to the object's `size_limit`, and `reset(key, value, update=False)` changes that
        attribute on one Cache object only, leaving the Settings table (and so every other worker's limit)
        alone. A second Cache object kept for this alone is what lowers it, never the one serving reads.
        """
        def cull(_: diskcache.Cache) -> None:
            culler = self._culler
            if culler is None:
                return
            with self._culling:
                culler.reset("size_limit", max(0, volume), update=False)
                culler.cull()
        self._guard(cull, None)


    def forget(self, key: str) -> int:
        def drop(cache: diskcache.Cache) -> int:
            entry = _decode(cache.pop(_meta_key(key), default=None))
            if entry is None:
                return 0
            cache.delete(_body_key(key, entry.meta.etag))
            _drop_variants(cache, key, entry.meta.etag)
            return 1
        return self._guard(drop, 0)

    def keys(self, prefix: str) -> list[str]:
        """Every cached key starting with `prefix`: a scan of the whole index, for the events sweep."""
        def scan(cache: diskcache.Cache) -> list[str]:
            self.scans += 1
            return [k[1] for k in cache.iterkeys()
                    if isinstance(k, tuple) and k[0] == "meta" and k[1].startswith(prefix)]
        return self._guard(scan, [])

    def purge_prefix(self, prefix: str) -> int:
        """Remove every entry whose key starts with `prefix` ("" for all); returns how many objects."""
        def drop(cache: diskcache.Cache) -> int:
            self.scans += 1
            doomed = [k for k in cache.iterkeys() if isinstance(k, tuple) and k[1].startswith(prefix)]
            for k in doomed:
                cache.delete(k)
            return sum(1 for k in doomed if k[0] == "meta")
        return self._guard(drop, 0)

"""This worker's in-memory layer over the index: recent entries and small bodies, and the shared stamp that
says when to forget them. A hit found here costs no executor hop and no SQLite read at all.
"""

from __future__ import annotations

import collections
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .models import Entry, HeldBody

__all__ = ["HOT_BODY_BUDGET", "HOT_BODY_MAX", "HOT_ENTRIES", "HotLayer", "Stamp", "held"]

HOT_BODY_MAX = 64 * 1024  # bodies up to this size are kept in memory once hit: one write(), no file, no hop
HOT_BODY_BUDGET = 16 * 1024 * 1024  # per worker; a docs site's hot pages, CSS and JS fit many times over
HOT_ENTRIES = 8192  # metadata records per worker (about 1 KiB each with their headers)


def held(handle: BinaryIO, data: bytes) -> HeldBody:
    """A small body to keep in memory: a read-only shared mapping of its cache file, so that the workers
    holding it share the page cache's one copy; as bytes, each worker held its own (2 workers, 300 hot
    pages: 9 MiB of identical bytes, benchmarks/results/footprint.md). Sound because the proxy never
    truncates or rewrites a cache file: bodies are renamed into place and unlinked when dropped, and a
    mapping keeps the inode it mapped. The caller reads the file first, so a disk error is an OSError there;
    only a page the kernel dropped and reads again after the disk failed would kill the worker (SIGBUS, as in
    Varnish's mmap'd storage): the supervisor restarts it, and its successor reads first.

    `data`: what that read gave, kept as it is when smaller than a page: a mapping would take a whole page
    and one of the kernel's limited mappings (vm.max_map_count) for a few bytes."""
    if len(data) < mmap.PAGESIZE:
        return data
    return memoryview(mmap.mmap(handle.fileno(), len(data), prot=mmap.PROT_READ))


def _cost(data: HeldBody) -> int:
    """What a held body takes: a mapping takes whole pages."""
    return len(data) if isinstance(data, bytes) else -(-len(data) // mmap.PAGESIZE) * mmap.PAGESIZE


class Stamp:
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


class HotLayer:
    """This worker's memory of recent metadata (per key) and small bodies (per key and ETag), both LRU-bounded.

    Entries are only a copy of what SQLite said under the current stamp (see `Stamp`), so they obey the TTL
    exactly as a lookup would. Bodies need no invalidation: a (key, ETag) body never changes, and one is
    only served for an entry that names that ETag; they were size- (and with verify_on_read, MD5-) checked
    when read from the file.
    """

    def __init__(self) -> None:
        self.stamp = b""
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self.bodies: collections.OrderedDict[tuple[str, str], HeldBody] = collections.OrderedDict()
        self.body_bytes = 0
        self._dropped: list[Callable[[], None]] = []

    def on_entries_dropped(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever every entry is dropped: for what is made from them (fasthit.py's answers)."""
        if listener not in self._dropped:
            self._dropped.append(listener)

    def sync(self, stamp: bytes) -> None:
        if stamp != self.stamp:
            self.stamp = stamp
            self._drop_entries()

    def _drop_entries(self) -> None:
        self.entries.clear()
        for listener in self._dropped:
            listener()

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

    def body(self, entry: Entry) -> HeldBody | None:
        ident = (entry.key, entry.meta.etag)
        data = self.bodies.get(ident)
        if data is not None:
            self.bodies.move_to_end(ident)
        return data

    def variant(self, key: str, etag: str, coding: str) -> HeldBody | None:
        """A compressed variant of (key, ETag): as immutable as the body, kept in the same budget."""
        ident = (key, f"{etag}\0{coding}")
        data = self.bodies.get(ident)
        if data is not None:
            self.bodies.move_to_end(ident)
        return data

    def keep_variant(self, key: str, etag: str, coding: str, data: HeldBody) -> None:
        self._keep((key, f"{etag}\0{coding}"), data)

    def keep_body(self, entry: Entry, data: HeldBody) -> None:
        self._keep((entry.key, entry.meta.etag), data)

    def _keep(self, ident: tuple[str, str], data: HeldBody) -> None:
        if ident in self.bodies:
            return
        self.bodies[ident] = data
        self.body_bytes += _cost(data)
        while self.body_bytes > HOT_BODY_BUDGET:
            self.body_bytes -= _cost(self.bodies.popitem(last=False)[1])

    def forget(self) -> None:
        self._drop_entries()
        self.bodies.clear()
        self.body_bytes = 0

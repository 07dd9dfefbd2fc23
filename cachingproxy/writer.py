"""Bodies into the cache: staging with room made first, and a full disk met without running out of memory.

The store's write path, synchronous (the async front in store.py runs it on its executor). Room is made in
the index for a body whose length S3 announced before a byte is written, counting what other fills in flight
have claimed, so the size limit is kept before the disk is. When there is no room anyway (another tenant of
the disk, a limit larger than the disk), the body passes through in a bounded window (bodies.Staging).
A disk-full episode is counted per body, logged when it starts and when it ends, and shown as `full`.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from .bodies import Staging, new_staging
from .index import INDEX_ERRORS, EntryIndex
from .models import Entry, ObjectMeta

__all__ = ["WRITE_ERRORS", "BodyWriter", "Count", "room_to_make"]

log = logging.getLogger(__name__)

Count = Callable[[str, int], None]  # how the store reports its counters (e.g. `Tally.add`)
WRITE_ERRORS = ("cache_write_errors",)  # the one counter the store reports
# Write errors that mean "no room" rather than "broken": the cache is full, not failed.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def room_to_make(size: int, *, volume: int, limit: int, free: int, reserved: int) -> int | None:
    """Bytes to evict before writing a body of `size` bytes, or None when no eviction can make it fit.

    `volume` is what the index holds, `limit` the configured size limit, `free` what the file system has
    left and `reserved` what fills in flight have claimed of it. The limit is kept before the disk is, so a
    fill never runs the disk out when its length is known.
    """
    if size > limit or size + reserved > free + volume:
        return None
    return max(0, volume + size - limit, size + reserved - free)


class BodyWriter:
    """stage / write / commit / discard for one cache directory's index and staging directory."""

    def __init__(self, index: EntryIndex, staging_dir: Path, size_limit: int, *, count: Count,
                 changed: Callable[[], None], usable: Callable[[], bool]) -> None:
        self._index = index
        self._staging_dir = staging_dir
        self._size_limit = size_limit
        self._count = count  # shared across workers when it is a Tally's add (tally.py)
        self._changed = changed  # after a metadata write (an eviction, a commit)
        self._usable = usable  # whether the cache directory is there (recreating it if it vanished)
        self.write_errors = 0  # bodies this worker could not write (the shared counter totals every worker)
        self.full = False  # in a disk-full episode: logged when it starts and when it ends
        self._reserved = 0  # bytes claimed by staging files in flight (see room_to_make)
        self._room = threading.Lock()  # guards the three above across executor threads

    def _failed(self) -> None:
        with self._room:
            self.write_errors += 1
        self._count(WRITE_ERRORS[0], 1)

    def _no_room(self, why: str) -> None:
        """A body could not go to disk for want of space: counted each time, logged once per episode."""
        self._failed()
        with self._room:
            started, self.full = not self.full, True
        if started:
            log.warning("cache disk full (%s): new bodies pass through uncached until there is room", why)

    def _room_again(self) -> None:
        with self._room:
            ended, self.full = self.full, False
        if ended:
            log.warning("cache disk has room again: caching resumed")

    def stage(self, key: str, meta: ObjectMeta) -> Staging:
        """A staging file with room made for `meta.size` bytes, or a pass-through (see bodies.Staging)."""
        passing = Staging(None, None, key, meta)
        if meta.size > self._size_limit or not self._usable():
            return passing  # larger than the whole cache: never stored, so nothing to make room for
        try:
            free = shutil.disk_usage(self._staging_dir).free
        except OSError as exc:
            self._failed()
            log.warning("cannot stage a body (%s): passing through", exc.__class__.__name__)
            return passing
        with self._room:
            reserved = self._reserved
        volume = self._index.volume()  # one read
        evict = room_to_make(meta.size, volume=volume, limit=self._size_limit, free=free, reserved=reserved)
        if evict is None:
            self._no_room(f"{meta.size} bytes do not fit")
            return passing
        if evict:
            self._index.evict_to(volume - evict)
            self._changed()
        try:
            staging = new_staging(self._staging_dir, key, meta)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                self._no_room(exc.__class__.__name__)
            else:
                self._failed()
                log.warning("cannot stage a body (%s): passing through", exc.__class__.__name__)
            return passing
        with self._room:
            self._reserved += meta.size
        return staging

    def _unreserve(self, staging: Staging) -> None:
        if staging.path is not None:
            with self._room:
                self._reserved -= staging.meta.size

    def write(self, staging: Staging, chunk: bytes) -> None:
        staging.write(chunk)
        self._report(staging)

    def flush(self, staging: Staging) -> None:
        """Write what the fill has received (bodies.Staging.receive) so far."""
        staging.flush()
        self._report(staging)

    def _report(self, staging: Staging) -> None:
        error = staging.disk_error
        if error is not None and not staging.reported:
            staging.reported = True
            if error.errno in _FULL_ERRNOS:
                self._no_room(error.__class__.__name__)
            else:
                self._failed()
                log.warning("cache disk write failed (%s): this body passes through uncached",
                            error.__class__.__name__)

    def commit(self, staging: Staging, now: float) -> Entry | None:
        entry = Entry(key=staging.key, meta=staging.meta, checked_at=now)
        path = staging.path
        self._unreserve(staging)
        if not self._index.available or path is None or not staging.committable:
            if path is not None and staging.disk_error is None:
                self._failed()  # (a disk error was counted when it happened)
            staging.discard_path()
            return None
        try:
            staging.sync()
            self._index.commit(entry, path, staging.written)
            staging.path = None
            self._changed()
        except INDEX_ERRORS as exc:
            if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
                self._no_room(exc.__class__.__name__)
            else:
                self._failed()
                log.warning("cache write failed (%s): served without caching", exc.__class__.__name__)
            staging.discard_path()
            return None
        self._room_again()
        return entry

    def discard(self, staging: Staging) -> None:
        self._unreserve(staging)
        staging.discard_path()

"""Cross-process single flight: one lock file per key being filled, so N workers fetch a cold key once.

A lock file is named after a digest of the key and lives only while its fill runs. Its holder writes into
it where its staging file is and what S3 said about the object (`publish`), so that another worker's fill
of the same key streams from that staging file as it grows instead of waiting for the end (`Published`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .models import ObjectMeta

__all__ = ["FillLocks", "Flight", "Published"]

_RECORD_MAX = 256 * 1024  # a record is a path and an object's metadata: far less than this

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Published:
    """Another worker's fill in flight, as it published it: follow `path` (None: its body passes through, so
    there is nothing to follow) until `FillLocks.finished` says it ended. `watch` is a descriptor of its
    lock file, closed by `hold` when the `async with` ends."""

    path: str | None
    meta: ObjectMeta
    watch: int
    verified: bool = False  # the body is complete and verified: its worker is making it durable and indexing it


@dataclass(frozen=True, slots=True)
class Flight:
    """How `FillLocks.hold` went: `waited` means another worker was filling, so look the key up again before
    fetching; `follow` is that worker's fill when it published one (the lock is then not held). Whether the
    lock is held in the end changes nothing for a caller that fetches: it fetches either way."""

    waited: bool
    follow: Published | None = None


def _encode(path: str | None, meta: ObjectMeta, verified: bool) -> bytes:
    return json.dumps({"pid": os.getpid(), "path": path, "etag": meta.etag, "size": meta.size,
                       "lm": meta.last_modified, "headers": meta.headers, "enc": meta.encrypted,
                       "verified": int(verified)}).encode()  # 0 or 1: the record keeps its length


def _decode(raw: bytes) -> tuple[str | None, ObjectMeta, bool] | None:
    try:
        record = json.loads(raw)
        meta = ObjectMeta(etag=record["etag"], size=int(record["size"]), last_modified=record["lm"],
                          headers=tuple((str(k), str(v)) for k, v in record["headers"]), encrypted=record["enc"])
        path = record["path"]
        verified = record.get("verified") == 1
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # not written yet, or caught mid-write: look again at the next poll
    return (path if isinstance(path, str) else None), meta, verified


class FillLocks:
    """One lock file per key being filled, so that N workers fetch a cold key from S3 once, not N times.

    In-process single-flight (service.py) already gives one fill per key per worker; the fill task then
    takes this lock before its GetObject and keeps it until the body is committed, and publishes its
    staging file in the lock file as soon as it has one. A worker that finds the lock held polls (never
    blocking a thread) until either the holder has published, and then follows that fill (`Flight.follow`:
    unlike nginx's proxy_cache_lock, its clients get bytes as they arrive), or the lock is free, and then it
    sees `waited=True`: it must look the key up again, because the other worker has most likely just
    committed it. After `timeout` without either it fetches anyway, without the lock, so a stuck fill
    elsewhere costs one duplicate S3 read, never an outage.

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
        self._held: dict[str, int] = {}  # key -> fd of the lock file this worker holds

    def _path(self, key: str) -> str:
        # Keys never become paths (docs/reliability.md §2): a digest is fixed-length and has no '/'.
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
        os.ftruncate(fd, 0)  # a record left by a holder that died is not this fill's
        return fd, False

    def _published(self, path: str) -> Published | None:
        """The record in a lock file someone else holds, with a descriptor to watch the lock through."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            decoded = _decode(os.pread(fd, _RECORD_MAX, 0))
        except OSError:
            decoded = None
        if decoded is None:
            os.close(fd)
            return None
        return Published(decoded[0], decoded[1], fd, decoded[2])

    def publish(self, key: str, path: str | None, meta: ObjectMeta, *, verified: bool = False) -> None:
        """Tell the other workers where this fill of `key` streams to (None: nowhere they can read), and then
        that its body is verified: only the commit is left (see `until_committed`)."""
        fd = self._held.get(key)
        if fd is None:
            return
        try:
            # The verified record differs from the first in one digit, so a reader never sees a stale tail.
            os.pwrite(fd, _encode(path, meta, verified), 0)
        except OSError as exc:
            log.warning("cannot publish a fill (%s): other workers wait for it instead", exc.__class__.__name__)

    @staticmethod
    def finished(fill: Published) -> bool:
        """Whether the publishing worker has let go of its lock: its fill ended, or it died (flock(2) locks
        die with their process). Non-blocking: a shared lock is only granted once the exclusive one is gone."""
        try:
            fcntl.flock(fill.watch, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        fcntl.flock(fill.watch, fcntl.LOCK_UN)
        return True

    async def until_committed(self, key: str) -> bool:
        """When another worker's fill of `key` has sent its last byte and is committing the body (fdatasync,
        the index), wait for that, so the caller's lookup finds the entry: True. False at once otherwise
        (one failed open(2) when no fill of the key is in flight)."""
        try:
            published = self._published(self._path(key))
        except OSError:
            return False
        if published is None:
            return False
        try:
            if not published.verified:
                return False
            # Polled: the end of another process's commit shows only as its flock going away.
            deadline = time.monotonic() + self._timeout
            while True:
                if self.finished(published) or time.monotonic() >= deadline:
                    return True
                await asyncio.sleep(self._poll)
        finally:
            os.close(published.watch)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[Flight]:
        """Hold the fill lock for `key` for the body of the `async with` (or give up after the timeout)."""
        path = self._path(key)
        fd: int | None = None
        waited = False
        follow: Published | None = None
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
                    follow = self._published(path)
                    if follow is not None:
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_poll)
        except OSError as exc:
            # Cache trouble is not an outage: fetch without the lock (and make the directory again next time).
            self._made = False
            log.warning("fill lock unavailable (%s): fetching without it", exc.__class__.__name__)
        if fd is not None:
            self._held[key] = fd
        try:
            yield Flight(waited=waited, follow=follow)
        finally:
            if follow is not None:
                os.close(follow.watch)
            if fd is not None:
                del self._held[key]
                with contextlib.suppress(OSError):
                    os.unlink(path)  # before unlocking: see the class docstring
                os.close(fd)  # closing the last fd releases the flock

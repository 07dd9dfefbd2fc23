"""Cross-process single flight: one lock file per key being filled, so N workers fetch a cold key once.

Nothing here touches cached data: a lock file is empty, named after a digest of the key, and lives only while
its fill runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FillLocks", "Flight"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Flight:
    """How `FillLocks.hold` went: `waited` means another worker was filling, so look the key up again before
    fetching. (Whether the lock is held in the end changes nothing for the caller: it fetches either way.)"""

    waited: bool


class FillLocks:
    """One lock file per key being filled, so that N workers fetch a cold key from S3 once, not N times.

    In-process single-flight (service.py) already gives one fill per key per worker; the fill task then
    takes this lock before its GetObject and keeps it until the body is committed. A worker that finds it
    held waits (polling, never blocking a thread), and when it gets it sees `waited=True`: it must look the
    key up again, because the other worker has most likely just committed it. After `timeout` it fetches
    anyway, without the lock, as nginx's proxy_cache_lock_timeout does, so a slow or stuck fill elsewhere
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
            yield Flight(waited=waited)
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # before unlocking: see the class docstring
                os.close(fd)  # closing the last fd releases the flock

"""Body files being written: staging files that readers follow while they grow, verified, then made durable.

A fill writes into `<cache>/staging/<pid>-*.part`; the index (index.py) later renames the verified file into
diskcache's value directory, so a body is never copied twice and a half-written file is never indexed.
Everything here blocks: the async front (store.py) runs it on its own executor.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .models import ObjectMeta

__all__ = ["Staging", "anonymous_staging", "new_staging", "remove_leftovers"]

log = logging.getLogger(__name__)


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

    def sync(self) -> None:
        """Make the written bytes durable before the file is indexed: diskcache never fsyncs, so without this a
        power loss can leave an indexed body shorter than its record (the size check on read still catches
        that, but then the body is fetched again)."""
        with self._lock:
            if not self._closed and self.fd is not None:
                os.fdatasync(self.fd)

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


def new_staging(directory: Path, key: str, meta: ObjectMeta) -> Staging:
    """A staging file for a body that may be committed; raises OSError when the directory cannot take one.

    Named after this worker's pid, because sibling workers share the directory (see `remove_leftovers`).
    """
    fd, path = tempfile.mkstemp(dir=directory, prefix=f"{os.getpid()}-", suffix=".part")
    return Staging(fd, path, key, meta)


def anonymous_staging(key: str, meta: ObjectMeta) -> Staging:
    """Waiters still share one S3 read through an anonymous file (or memory); it is never committed."""
    try:
        with tempfile.TemporaryFile() as handle:
            return Staging(os.dup(handle.fileno()), None, key, meta)
    except OSError:
        return Staging(None, None, key, meta)


def remove_leftovers(directory: Path) -> None:
    """Staging files left by a crash were never indexed: remove them (RELIABILITY.md §0.5).

    Files are named after the worker that writes them, because sibling workers share this directory and
    a restarting worker must not delete their fills in flight. Our own pid's files are leftovers too
    (pid reuse: pid 1 in every container run).
    """
    me = os.getpid()
    for leftover in directory.iterdir():
        owner = leftover.name.partition("-")[0]
        if owner.isdigit() and int(owner) != me and _alive(int(owner)):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


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

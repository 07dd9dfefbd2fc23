"""Body files being written: staging files that readers follow while they grow, verified, then made durable.

A fill writes into `<cache>/staging/<pid>-*.part`; the index (index.py) later renames the verified file into
diskcache's value directory, so a body is never copied twice and a half-written file is never indexed.
Everything here blocks: the async front (store.py) runs it on its own executor.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import os
import shutil
import tempfile
import threading
from pathlib import Path

try:  # zlib-ng's CRC32 (vectorised): the same numbers at a tenth of the stdlib zlib's CPU (cold-large.md)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # without the `fast` extra
    from zlib import crc32

from .models import ObjectMeta

__all__ = ["PASS_THROUGH_WINDOW", "FellBehind", "Staging", "new_staging", "remove_leftovers"]

# What a body that cannot go to disk may hold in memory, per fill: bounded whatever the object's size.
PASS_THROUGH_WINDOW = 8 * 1024 * 1024
_IOV_CHUNKS = 256  # chunks per writev(2): well under IOV_MAX (1024 on Linux)


class FellBehind(Exception):
    """A reader asked for bytes of a pass-through body that have already left its window."""


class Staging:
    """One body being written: a file that readers `pread` while it grows, then verified and committed.

    The fill hands each chunk over with `receive` (on the loop, without waiting for the disk) and `flush`
    writes what was received, in order, on the store's executor: bytes [on_disk, written) are held in memory
    meanwhile, and readers that are ahead of the disk take them from there (`buffered`), so neither S3's
    stream nor the client waits for a write (benchmarks/results/cold-large.md).

    The fd stays valid after the file is renamed into the cache or unlinked, so readers that joined a fill
    keep reading the same bytes whatever happens to the path. If the disk fails mid-body (ENOSPC, EFBIG),
    or there was never a file (`fd` None: no room, or larger than the cache), the body passes through:
    only its last `window` bytes are kept in memory, whatever its size, and a reader that falls further
    behind gets `FellBehind` (the service then reads the rest from S3 for it). Such a body is never
    committed.
    """

    @classmethod
    def complete(cls, fd: int, key: str, meta: ObjectMeta) -> Staging:
        """A body another worker already committed, to read from like a finished fill (never committed again)."""
        staging = cls(fd, None, key, meta)
        staging.written = staging._on_disk = meta.size
        return staging

    def __init__(self, fd: int | None, path: str | None, key: str, meta: ObjectMeta, *,
                 window: int = PASS_THROUGH_WINDOW) -> None:
        self.fd = fd
        self.key = key
        self.meta = meta
        self.written = 0  # bytes received: [0, on_disk) in the file, the rest in `_tail` and `_pending`
        self.path = path  # None: a pass-through or a finished body, which can serve readers but never be committed
        self.disk_error: OSError | None = None  # why this body stopped going to disk, once it has
        self.reported = False  # whether the store has counted and logged `disk_error`
        self._on_disk = 0  # bytes [0, _on_disk) are in the file
        self._window = window
        self._tail: collections.deque[bytes] = collections.deque()  # a pass-through's window, from _tail_start
        self._tail_start = 0
        self._tail_bytes = 0
        self._pending: collections.deque[bytes] = collections.deque()  # received, not yet flushed: up to written
        self._pending_bytes = 0
        self._md5 = hashlib.md5(usedforsecurity=False) if meta.md5 else None
        self._crc32_expected: int | None = None  # S3's CRC32 of the body, checked here (`check_crc32`)
        self._crc32 = 0
        self._closed = False
        # A fill writes in an executor thread while the loop may close the file (a cancelled fill, the last
        # reader leaving): the fd must never be closed, and perhaps reused, under a write.
        self._lock = threading.Lock()
        # The chunks held in memory and the counters that say where they start: taken for a few list
        # operations at a time, never across a system call, so the loop can take it too.
        self._mem = threading.Lock()

    @property
    def on_disk(self) -> int:
        """Bytes [0, on_disk) can be read from `fd` (and sent with sendfile) for as long as the file is open."""
        return self._on_disk

    @property
    def pending(self) -> int:
        """Bytes received and not yet flushed (to the file, or to a pass-through's window)."""
        return self._pending_bytes

    @property
    def committable(self) -> bool:
        return self.path is not None and self.disk_error is None

    @classmethod
    def following(cls, fd: int, key: str, meta: ObjectMeta) -> Staging:
        """Another worker's staging file, read as it grows (see `observe`); never written or committed here."""
        staging = cls(fd, None, key, meta)
        staging.observe()
        return staging

    def observe(self) -> bool:
        """For a followed file: take in what its writer has added since; whether anything was.

        One fstat(2) of an open local file: it does not wait on the disk, so the loop may call it.
        """
        assert self.fd is not None
        size = min(os.fstat(self.fd).st_size, self.meta.size)
        if size <= self._on_disk:
            return False
        self.written = self._on_disk = size
        return True

    def checked_elsewhere(self) -> None:
        """The body is verified as it is read (origin.ObjectBody.checked): no MD5 of our own. Before any write."""
        assert self.written == 0
        self._md5 = None

    def check_crc32(self, expected: int) -> None:
        """Check the body against S3's whole-object CRC32 (origin.ObjectBody.crc32) instead of the ETag's MD5;
        before any write. Computed in `flush`, off the loop (the CRC32 lets go of the GIL), and part of
        `problem`, so a body that fails it is never committed and its last byte never released."""
        self.checked_elsewhere()
        self._crc32_expected = expected

    def receive(self, chunk: bytes) -> None:
        """The next bytes of the body, held until `flush` (no system call: the loop calls this)."""
        with self._mem:
            if self._closed:
                return
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            self.written += len(chunk)

    def flush(self) -> None:
        """Write every chunk received so far, in order (blocking: the store's executor, one flush at a time)."""
        while True:
            with self._mem:
                if not self._pending or self._closed:
                    return
                chunks = list(itertools.islice(self._pending, _IOV_CHUNKS))
            with self._lock:
                self._write_all(chunks)
            with self._mem:
                if len(self._pending) < len(chunks):
                    return  # close() emptied the queue meanwhile
                # Only now: until here a reader past the file still finds these bytes in `_pending`.
                for chunk in chunks:
                    self._pending.popleft()
                    self._pending_bytes -= len(chunk)

    def write(self, chunk: bytes) -> None:
        """`receive` and `flush` in one (blocking)."""
        self.receive(chunk)
        self.flush()

    def _write_all(self, chunks: list[bytes]) -> None:
        """`_write` of each chunk in turn, with one writev(2) for as many as the file takes: one system call
        per flush instead of one per piece of S3's stream, each a round of the GIL with the loop thread."""
        if self._closed:
            return
        if len(chunks) > 1 and self.fd is not None and self.disk_error is None:
            try:
                n = os.writev(self.fd, chunks)
            except OSError:
                n = 0  # met again by `_write`, which handles it
            self._on_disk += n
            done = 0
            while done < len(chunks) and n >= len(chunks[done]):
                n -= len(chunks[done])
                self._digest(chunks[done])
                done += 1
            if n:  # part of a chunk went in: its rest as `_write` would
                self._write(chunks[done], n)
                done += 1
            chunks = chunks[done:]
        for chunk in chunks:
            self._write(chunk)

    def _write(self, chunk: bytes, skip: int = 0) -> None:
        """`chunk` to the file (but for its first `skip` bytes, already there), or kept in memory once the disk
        has failed; into the digests either way."""
        if self._closed:
            return
        view = memoryview(chunk)[skip:]
        if self.fd is not None and self.disk_error is None:
            try:
                while view:
                    n = os.write(self.fd, view)
                    self._on_disk += n
                    view = view[n:]
            except OSError as exc:
                self.disk_error = exc
                with self._mem:
                    self._tail_start = self._on_disk
        if view:
            self._keep(chunk if len(view) == len(chunk) else bytes(view))
        self._digest(chunk)

    def _digest(self, chunk: bytes) -> None:
        if self._md5 is not None:
            self._md5.update(chunk)
        if self._crc32_expected is not None:
            self._crc32 = crc32(chunk, self._crc32)

    def _keep(self, data: bytes) -> None:
        with self._mem:
            self._tail.append(data)
            self._tail_bytes += len(data)
            # At most `window` bytes plus the chunk just written, so a reader at the window's edge can finish it.
            while self._tail_bytes - len(self._tail[0]) >= self._window:
                dropped = self._tail.popleft()
                self._tail_bytes -= len(dropped)
                self._tail_start += len(dropped)

    def pread(self, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset`, which must be below `written`; raises FellBehind (see the class)."""
        while True:
            if offset < self._on_disk:
                assert self.fd is not None
                return os.pread(self.fd, min(size, self._on_disk - offset), offset)
            data = self.buffered(size, offset)
            if data is not None:
                return data

    def buffered(self, size: int, offset: int) -> bytes | None:
        """Up to `size` bytes at `offset` (below `written`) from memory, without a system call, so the loop may
        call it; None when they have meanwhile gone to the file (read them there); raises FellBehind."""
        with self._mem:
            if offset < self._on_disk:
                return None
            if offset < self._tail_start:
                raise FellBehind(offset)
            at = self._tail_start
            for data in self._tail:
                if offset < at + len(data):
                    return _piece(data, offset - at, size)
                at += len(data)
            at = self.written - self._pending_bytes
            for data in self._pending:
                if offset < at + len(data):
                    return _piece(data, offset - at, size)
                at += len(data)
        return b""

    def problem(self) -> str | None:
        """Why this body must not be cached, or None when it is complete and intact."""
        if self.written != self.meta.size:
            return f"length {self.written} != Content-Length {self.meta.size}"
        if self._md5 is not None and self._md5.hexdigest() != self.meta.md5:
            return "MD5 does not match the ETag"
        if self._crc32_expected is not None and self._crc32 != self._crc32_expected:
            return "CRC32 does not match S3's checksum"
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
                with self._mem:
                    self._closed = True
                    self._tail.clear()
                    self._pending.clear()
                    # Nothing is pending once closed: a write-behind still running would otherwise start
                    # flush after flush, each finding nothing to write (writebehind.WriteBehind._again).
                    self._pending_bytes = 0
                if self.fd is not None:
                    os.close(self.fd)

    def discard_path(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


def _piece(data: bytes, start: int, size: int) -> bytes:
    # A reader keeping up takes each chunk whole: the very object S3 gave us, not a copy.
    return data if start == 0 and size >= len(data) else data[start : start + size]


def new_staging(directory: Path, key: str, meta: ObjectMeta) -> Staging:
    """A staging file for a body that may be committed; raises OSError when the directory cannot take one.

    Named after this worker's pid, because sibling workers share the directory (see `remove_leftovers`).
    """
    fd, path = tempfile.mkstemp(dir=directory, prefix=f"{os.getpid()}-", suffix=".part")
    return Staging(fd, path, key, meta)


def remove_leftovers(directory: Path) -> None:
    """Staging files left by a crash were never indexed: remove them (docs/reliability.md §0.5).

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

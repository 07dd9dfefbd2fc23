"""One GetObject shared by every request for its key: the staging file it streams into, and its readers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .models import ObjectMeta
from .origin import OriginError, OriginUnavailable
from .store import FellBehind, Staging

__all__ = ["CHUNK_SIZE", "FileSpan", "Fill"]

CHUNK_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class FileSpan:
    """`count` bytes at `offset` of the open file `fd`, for the handler to sendfile: a fill's readers then
    hold no copy of the body in memory, however many there are (issue 17: 250 clients of one cold 64 MiB
    object cost 207 MiB above idle when each copied its own chunks; 8 MiB with sendfile)."""

    fd: int
    offset: int
    count: int


class Fill:
    """One GetObject streaming into one staging file, shared by every request for that key.

    Readers follow the file as it grows (so one slow client never slows S3 or the others), and the last
    byte of the object is released only once the whole body has been verified.
    """

    def __init__(self, key: str, read_part: Callable[[ObjectMeta, int, int], AsyncIterator[bytes]]) -> None:
        self.key = key
        self._read_part = read_part  # bytes [start, end) of this version in a GetObject of their own
        self.ready: asyncio.Future[ObjectMeta] = asyncio.get_running_loop().create_future()
        self.staging: Staging | None = None
        # Stagings replaced while readers may still be sending from their fds (a followed fill taken over,
        # or a committed body adopted): closed with the current one, when the last reader leaves.
        self.retired: list[Staging] = []
        self.verified = False
        self.error: OriginError | None = None
        self.done = False
        self.readers = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """Readers waiting in `changed` look again: more bytes, the end, or an error."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def fail(self, error: OriginError) -> None:
        self.error = error
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody may be waiting on a failed fill
        self.notify()

    async def read(self, start: int, end: int) -> AsyncIterator[bytes | FileSpan]:
        """Bytes [start, end) of a fill as they arrive, as spans of its staging file where they are on disk;
        raises OriginError if the fill fails first. A span's fd stays open until `leave`."""
        assert self.staging is not None, "read() only between joining and leave()"
        size = self.staging.meta.size
        offset = start
        while offset < end:
            staging = self.staging  # again each time: a fill taken over from another worker has a new one
            assert staging is not None
            # The final byte waits for verification, so a corrupt or short body can never look complete.
            available = staging.written if self.verified else min(staging.written, size - 1)
            if available <= offset:
                if self.error is not None:
                    raise self.error
                await self.changed()
                continue
            count = min(available, end) - offset
            if staging.fd is not None and offset < staging.on_disk:
                span = min(count, staging.on_disk - offset)
                yield FileSpan(staging.fd, offset, span)
                offset += span
                continue
            # Ahead of the file (the usual case for a reader keeping up with S3): the bytes are still in
            # memory, where the fill put them, whole chunks being the very objects S3 gave us.
            try:
                chunk = staging.buffered(min(count, CHUNK_SIZE), offset)
            except FellBehind:
                # A body passing through (no room on disk) keeps only a window in memory; this reader
                # is slower than S3, so it reads the rest at its own pace, of the same version.
                async for chunk in self._read_part(staging.meta, offset, end):
                    yield chunk
                return
            if chunk is None:
                continue  # written to the file meanwhile: sent from there
            if not chunk:
                raise OriginUnavailable("staging file shorter than reported")
            offset += len(chunk)
            yield chunk
        # A whole-object response ends only once the body is verified (this is what makes an empty object
        # wait too). Not once it is indexed: the next request for the key waits for that (service.resolve).
        while end == size and not self.verified:
            if self.error is not None:
                raise self.error
            await self.changed()

    async def verified_body(self) -> None:
        """Until the whole body is verified; raises the fill's OriginError if it fails first."""
        while not self.verified:
            if self.error is not None:
                raise self.error
            await self.changed()

    async def settled(self) -> None:
        """Until the fill has ended: its body committed to the cache (or refused by it), or failed."""
        while not self.done:
            await self.changed()

    def leave(self) -> None:
        """A request that joined this fill is done with it (read or not): the last one closes the file."""
        self.readers -= 1
        self.close_if_unused()

    def replace_staging(self, staging: Staging) -> None:
        if self.staging is not None:
            self.retired.append(self.staging)
        self.staging = staging

    def close_if_unused(self) -> None:
        if self.done and self.readers == 0:
            if self.staging is not None:
                staging, self.staging = self.staging, None
                staging.close()
            while self.retired:
                self.retired.pop().close()

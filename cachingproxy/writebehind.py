"""A fill's disk writes behind its S3 stream: chunks are handed to the staging file without waiting for the
disk, and written in order on the store's executor while the next ones arrive.

Waiting for each write before reading the next chunk put an executor round trip and a write(2) (and the MD5,
when there is one) between every two S3 reads, and the client, which was fed from the file, waited for them
too: a cold 100 MB object took 3x the direct fetch (benchmarks/results/cold-large.md). Readers now take bytes
that are not yet on disk from memory (bodies.Staging.buffered). Memory stays bounded: past `limit` bytes
received and not written, the fill waits for the disk before it reads more from S3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .bodies import Staging

__all__ = ["WRITE_BEHIND_LIMIT", "WriteBehind"]

# Bytes a fill may hold in memory ahead of its file: a few chunks, enough to ride out a slow write(2)
# (page-cache writeback throttling) without slowing S3's stream; never more, whatever the object's size.
WRITE_BEHIND_LIMIT = 4 * 1024 * 1024


class WriteBehind:
    """put(chunk) for each chunk of a body, then finish(): everything received is then written."""

    def __init__(self, staging: Staging, flush: Callable[[Staging], Awaitable[None]], *,
                 limit: int = WRITE_BEHIND_LIMIT) -> None:
        self._staging = staging
        self._flush = flush  # writes what `staging` received so far (store.flush: its executor)
        self._limit = limit
        self._flushing: asyncio.Task[None] | None = None

    async def put(self, chunk: bytes) -> None:
        """Hand `chunk` over; returns at once unless the file lags `limit` bytes behind."""
        self._staging.receive(chunk)
        self._kick()
        while self._staging.pending > self._limit:
            await self._wait()

    async def finish(self) -> None:
        """Until every chunk handed over is written (or kept, for a body passing through)."""
        while self._staging.pending:
            await self._wait()
        if self._flushing is not None:
            await self._flushing

    def _kick(self) -> None:
        # One flush at a time, so chunks reach the file in order.
        if self._flushing is not None:
            if not self._flushing.done():
                return
            self._flushing.result()  # a bug in a flush surfaces here, not as a silent short file
        if self._staging.pending:
            self._flushing = asyncio.ensure_future(self._flush(self._staging))
            self._flushing.add_done_callback(self._again)

    def _again(self, flushed: asyncio.Task[None]) -> None:
        # A chunk received while the flush was ending (after its last look) would otherwise wait for the
        # next one; if S3 stalls there, other workers following the file would not see it.
        if not flushed.cancelled() and flushed.exception() is None:
            self._kick()

    async def _wait(self) -> None:
        assert self._flushing is not None
        # shield: cancelling the fill must not leave a flush running unseen (close() waits for its write).
        await asyncio.shield(self._flushing)
        self._kick()

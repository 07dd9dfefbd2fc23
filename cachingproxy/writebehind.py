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

# Bytes a fill may hold in memory ahead of its file: two flush batches, enough to ride out a slow write(2)
# (page-cache writeback throttling) without slowing S3's stream; never more, whatever the object's size. At
# 4 MiB a filling worker's peak was about 1 MiB higher, for no faster a cold fill (footprint.md).
WRITE_BEHIND_LIMIT = 2 * 1024 * 1024
# A flush starts once this much is waiting, or FLUSH_DELAY after the first byte that waits. One per piece
# of S3's stream (about 400 per 100 MiB) cost the loop a task, an executor hand-off and a wake-up each, a
# tenth of its CPU in a cold fill; readers keeping up are fed from memory and do not wait for the disk.
FLUSH_BATCH = 1024 * 1024
# Bounds how long received bytes wait for the disk when S3's stream stalls: other workers following the
# fill read them from the file (filling._follow).
FLUSH_DELAY = 0.005


class WriteBehind:
    """put(chunk) for each chunk of a body, then finish(): everything received is then written."""

    def __init__(self, staging: Staging, flush: Callable[[Staging], Awaitable[None]], *,
                 limit: int = WRITE_BEHIND_LIMIT, batch: int = FLUSH_BATCH) -> None:
        self._staging = staging
        self._flush = flush  # writes what `staging` received so far (store.flush: its executor)
        self._limit = limit
        self._batch = min(batch, limit)
        self._flushing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def put(self, chunk: bytes) -> None:
        """Hand `chunk` over; returns at once unless the file lags `limit` bytes behind."""
        self._staging.receive(chunk)
        self._kick(now=False)
        while self._staging.pending > self._limit:
            await self._wait()

    async def finish(self) -> None:
        """Until every chunk handed over is written (or kept, for a body passing through)."""
        self._kick()
        while self._staging.pending:
            await self._wait()
        if self._flushing is not None:
            await self._flushing

    def _kick(self, *, now: bool = True) -> None:
        # One flush at a time, so chunks reach the file in order.
        if self._flushing is not None:
            if not self._flushing.done():
                return
            self._flushing.result()  # a bug in a flush surfaces here, not as a silent short file
        pending = self._staging.pending
        if not pending:
            return
        if now or pending >= self._batch:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flushing = asyncio.ensure_future(self._flush(self._staging))
            self._flushing.add_done_callback(self._again)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._due)

    def _due(self) -> None:
        self._timer = None
        self._kick()

    def _again(self, flushed: asyncio.Task[None]) -> None:
        # Chunks received while the flush was ending (after its last look) are flushed in their turn:
        # at once if a batch is waiting, else within FLUSH_DELAY.
        if not flushed.cancelled() and flushed.exception() is None:
            self._kick(now=False)

    async def _wait(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._kick()
        assert self._flushing is not None
        # shield: cancelling the fill must not leave a flush running unseen (close() waits for its write).
        await asyncio.shield(self._flushing)
        self._kick()

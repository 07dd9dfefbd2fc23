"""The fast-path tricks, in one labelled place. The request handlers in app.py read as plain aiohttp; what
they call from here buys speed or bounded resources at a maintenance cost, each listed with its figure
(benchmarks/results/hot-path-changes.md, quick runs of `benchmarks/run.py`, 2 workers, 2-30 KB objects).

1. `memo_headers`: an object's response headers built once per (version, outcome, Age second, TTL left,
   stored Date, browser Cache-Control)
   instead of per hit: dates, strings and a multidict cost more than the rest of a hit from memory. Part of
   the step that took hot hits from 0.33 to 0.42 of a bare aiohttp handler. Cost: the memo's key must name
   everything the headers depend on; a header that varies per request cannot go in here. Age and TTL-left
   are in the key, so an entry is only used again within its second: the memo is emptied when the second
   changes, and bounded at 1024 for the objects hit in one second. Kept across seconds, its 1024 stale heads
   held 1.5 MiB per worker for good (tracemalloc, heads of 9 headers; at 4096, it and
   compressed.coded_headers held 2-3 MiB: benchmarks/results/footprint.md).
2. `memo_request_key`: the raw path's decoding, containment check and index-document mapping remembered per
   path (same step as 1), from its second request on (admission.SecondSight), so that paths asked for once
   never fill it. Cost: paths over 512 bytes bypass it, so hostile ones cannot grow it.
3. `send_file`: sendfile(2) through a dup of the socket's fd, because uvloop has no loop.sendfile
   (uvloop#228). Bodies never pass through Python: a 10 MB hit is 0.87-0.98x nginx's throughput. Cost: it
   writes beside the transport, which is only correct while the handler is its connection's only writer.
   Over TLS the kernel cannot encrypt, so the body is read in chunks and written through aiohttp instead.
4. `reset`: SO_LINGER 0 before closing a stalled or truncated response (nginx's reset_timedout_connection),
   so the kernel drops what it still holds instead of keeping the socket alive behind a FIN. Cost: none
   beyond knowing why it is there.
5. `freeze_heap`: gc.freeze() of each worker's startup heap, so full collections stop walking botocore's
   service models: p99 of hot hits 61 ms -> 13 ms. Cost: objects alive at startup are never collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import socket
import struct
from typing import BinaryIO

from aiohttp import web
from multidict import CIMultiDictProxy

from .admission import SecondSight, ThisSecond
from .freshness import ClientFreshness
from .headers import object_headers
from .keys import Key, Redirect, Reject, request_key
from .models import ObjectMeta, Outcome

__all__ = ["freeze_heap", "memo_headers", "memo_request_key", "reset", "send_file"]


_HEADS_SECOND = ThisSecond()


def memo_headers(meta: ObjectMeta, outcome: Outcome, age: int, left: int | None, checked: int | None,
                 client: ClientFreshness, now: float) -> CIMultiDictProxy[str]:
    """headers.object_headers, remembered (1) within the second `now` is in."""
    if _HEADS_SECOND.turned(now):
        _memo_headers.cache_clear()
    return _memo_headers(meta, outcome, age, left, checked, client)


@functools.lru_cache(maxsize=1024)
def _memo_headers(meta: ObjectMeta, outcome: Outcome, age: int, left: int | None, checked: int | None,
                  client: ClientFreshness) -> CIMultiDictProxy[str]:
    return object_headers(meta, outcome, age, left, checked, client)


_MEMO_PATH = 512  # longer paths are decoded every time, so hostile ones cannot make the memo below large


# Paths asked for once (cold fills, 404 scans, crawlers) are decoded without being remembered: at 1024 entries
# the memo otherwise took minutes of such traffic to fill, growing all the while (admission.py).
_PATHS_SEEN = SecondSight()


def memo_request_key(raw_path: str, mount: str, prefix: str, index_document: str, *,
                     noted: bool = True) -> Key | Reject | Redirect:
    """keys.request_key, remembered per raw path asked for more than once (2). `noted` False: this look does
    not count as a request for the path (fasthit.py tries each request before the ordinary path sees it)."""
    if len(raw_path) > _MEMO_PATH or not (_PATHS_SEEN.again(raw_path) if noted else _PATHS_SEEN.seen(raw_path)):
        return request_key(raw_path, mount=mount, prefix=prefix, index_document=index_document)
    return _memo_request_key(raw_path, mount, prefix, index_document)


@functools.lru_cache(maxsize=1024)
def _memo_request_key(raw_path: str, mount: str, prefix: str, index_document: str) -> Key | Reject | Redirect:
    return request_key(raw_path, mount=mount, prefix=prefix, index_document=index_document)


def reset(request: web.Request) -> None:
    """Reset the connection. SO_LINGER 0 makes the close an RST that also drops what the kernel still holds
    for the client (as nginx's reset_timedout_connection); a plain close would queue a FIN behind megabytes
    a stalled client never reads, keeping the socket alive in the kernel."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()


_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


async def send_file(request: web.Request, body: BinaryIO | int, offset: int, count: int, stall: float) -> None:
    """sendfile(2) from the cached file (or a fill's staging file, by fd) under our own validators (aiohttp's
    FileResponse invents its own), never copied in Python; TimeoutError when the client takes nothing for
    `stall` seconds.

    Bodies held in memory never get here: app.py sends them with their headers in one write. The socket
    is reached through a dup of its fd, because uvloop has no loop.sendfile (uvloop#228) and refuses
    add_writer on an fd one of its transports owns; both fds are the same socket, so the bytes stay in order
    as long as nothing else writes meanwhile, which holds: this handler is the only writer of its connection.
    The standard loop takes the same path, so tests run what production runs.
    """
    loop = asyncio.get_running_loop()
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise ConnectionResetError("client went away")
    if transport.get_extra_info("sslcontext") is not None:
        await _send_encrypted(request, body, offset, count, stall)
        return
    async with asyncio.timeout(stall):
        await _drained(transport)
    fd = body if isinstance(body, int) else body.fileno()
    out = os.dup(sock.fileno())
    try:
        while count > 0:
            try:
                sent = os.sendfile(out, fd, offset, count)
            except BlockingIOError:
                sent = -1
            if sent == 0:
                raise ConnectionResetError("cached body shrank while being sent")
            if sent > 0:
                offset += sent
                count -= sent
                continue
            writable = loop.create_future()
            loop.add_writer(out, _wake, writable)
            try:
                async with asyncio.timeout(stall):
                    await writable
            finally:
                loop.remove_writer(out)
            if transport.is_closing():
                raise ConnectionResetError("client went away")
    finally:
        os.close(out)


TLS_CHUNK = 256 * 1024


async def _send_encrypted(request: web.Request, body: BinaryIO | int, offset: int, count: int, stall: float) -> None:
    """HTTPS ([server] tls_certificate): bytes written to the socket's fd would skip the encryption, so the
    body goes through the response's writer, read in chunks off the loop; its write() waits for the
    client's pace (backpressure)."""
    loop = asyncio.get_running_loop()
    fd = body if isinstance(body, int) else body.fileno()
    while count > 0:
        chunk = await loop.run_in_executor(None, os.pread, fd, min(TLS_CHUNK, count), offset)
        if not chunk:
            raise ConnectionResetError("cached body shrank while being sent")
        async with asyncio.timeout(stall):
            await request.writer.write(chunk)
        offset += len(chunk)
        count -= len(chunk)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _drained(transport: asyncio.Transport) -> None:
    """Until the transport's write buffer is empty: at most the response head, which almost always left at once."""
    while transport.get_write_buffer_size() > 0:
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        await asyncio.sleep(0.001)


async def freeze_heap(app: web.Application) -> None:
    """(5) An on_startup hook: runs after the app's cleanup contexts have opened everything."""
    gc.collect()
    gc.freeze()

"""Compressed variants of cached objects: made once per object version in the background, stored beside the
body under the same ETag (index.py drops them with their object), and found again on later hits.

A hit never waits for compression: until a version's variants exist, it is served identity bytes and the
first such hit starts one task that makes them (br, zstd, gzip) on a single thread, so compression can take
at most one core's worth of time from serving. Another worker that already made them is found in the index
first, so each version is compressed once per cache unless two workers start on it at the same moment.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import logging
from concurrent.futures import Executor
from typing import BinaryIO

import brotli
import zstandard

from .config import CompressionConfig
from .encoding import CODINGS, worth_compressing
from .models import Entry, HeldBody
from .namespace import NamespacedStore

__all__ = ["LARGEST", "Variants", "compress"]

log = logging.getLogger(__name__)

# Bodies above this are not compressed (read whole into memory to compress; text this large is rare).
LARGEST = 32 * 1024 * 1024
# Levels for size: the work is done once per version. brotli 11 costs about 1 s per MB of text on this machine
# (tests/test_variants.py), so larger bodies get quality 9 which is ~10x faster for ~3 % more bytes.
_BROTLI_SMALL = 1024 * 1024
_KNOWN = 1024  # (key, ETag) versions asked for since their variant set was found (like the other per-object memos)
# Versions whose variant set was found (a fill just made them) and nobody has asked for since: a stream of
# one-off fills (a crawler, first views) turns over here, where it filled _KNOWN for minutes (footprint.md).
_UNASKED = 128
_CODING_SETS: dict[frozenset[str], frozenset[str]] = {}


def compress(data: HeldBody, coding: str) -> bytes:
    """One variant, by the library (never our own codec)."""
    if coding == "br":
        quality = 11 if len(data) <= _BROTLI_SMALL else 9
        return bytes(brotli.compress(data, mode=brotli.MODE_TEXT, quality=quality))
    if coding == "zstd":
        return zstandard.ZstdCompressor(level=19 if len(data) <= _BROTLI_SMALL else 12).compress(data)
    if coding == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    raise ValueError(coding)


def _read_all(handle: BinaryIO) -> bytes:
    handle.seek(0)
    return handle.read()


class Variants:
    """present(key, etag) -> the codings stored for that version, or None when not known yet (then ensure())."""

    def __init__(self, store: NamespacedStore, config: CompressionConfig, executor: Executor) -> None:
        self._store = store
        self._config = config
        self._executor = executor
        self._known: collections.OrderedDict[tuple[str, str], frozenset[str]] = collections.OrderedDict()
        self._unasked: collections.OrderedDict[tuple[str, str], frozenset[str]] = collections.OrderedDict()
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        if config.enabled:
            store.on_commit(self.committed)

    def committed(self, entry: Entry) -> None:
        """A new body is in the cache: make its variants now, in the background, if it is worth it."""
        if worth_compressing(dict(entry.meta.headers), entry.meta.size, types=self._config.types,
                             min_size=self._config.min_size):
            self.lost(entry.key, entry.meta.etag)  # refetched after a purge: look again
            self.ensure(entry)

    def present(self, key: str, etag: str) -> frozenset[str] | None:
        known = self._known.get((key, etag))
        if known is None:
            known = self._unasked.pop((key, etag), None)
            if known is not None:  # asked for: kept with the versions that are
                self._known[(key, etag)] = known
                while len(self._known) > _KNOWN:
                    self._known.popitem(last=False)
        return known

    def lost(self, key: str, etag: str) -> None:
        """A variant said to be present was not there (evicted, purged by another worker): look again."""
        self._known.pop((key, etag), None)
        self._unasked.pop((key, etag), None)

    def ensure(self, entry: Entry) -> None:
        """Start making this version's variants unless that is known or under way."""
        ident = (entry.key, entry.meta.etag)
        if ident in self._known or ident in self._unasked or ident in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._make(entry))
        self._tasks[ident] = task
        task.add_done_callback(lambda _: self._tasks.pop(ident, None))

    async def wait(self) -> None:
        """Until no variant is being made (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _remember(self, ident: tuple[str, str], codings: frozenset[str]) -> None:
        # One frozenset per set of codings (there are 8), not one per version: 216 bytes each.
        codings = _CODING_SETS.setdefault(codings, codings)
        if ident in self._known:
            self._known[ident] = codings
            return
        self._unasked[ident] = codings  # until present() is asked for it
        while len(self._unasked) > _UNASKED:
            self._unasked.popitem(last=False)

    async def _make(self, entry: Entry) -> None:
        key, etag = entry.key, entry.meta.etag
        store = self._store
        loop = asyncio.get_running_loop()
        try:
            # From the index, not by opening each: open_variant would pull every coding into this worker's memory.
            have = set(await store.stored_variants(key, etag))
            if len(have) == len(CODINGS) or entry.meta.size > LARGEST:
                self._remember((key, etag), frozenset(have))
                return
            body = await store.open_body(entry, hit=False)
            if body is None:
                return  # gone meanwhile: the next hit refetches and asks again
            try:
                data = body if isinstance(body, HeldBody) else await loop.run_in_executor(None, _read_all, body)
            finally:
                await store.close_body(body)
            for coding in CODINGS:
                if coding in have:
                    continue
                packed = await loop.run_in_executor(self._executor, compress, data, coding)
                if len(packed) >= len(data):
                    continue  # nothing gained: this coding is simply not offered for this version
                if not await store.put_variant(key, etag, coding, packed):
                    return  # the version changed or the cache refused: remember nothing
                have.add(coding)
            self._remember((key, etag), frozenset(have))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Compression is an optimisation: any failure leaves identity bytes, which are always right.
            log.warning("compressed variants not made (%s)", exc.__class__.__name__)
            self._remember((key, etag), frozenset())

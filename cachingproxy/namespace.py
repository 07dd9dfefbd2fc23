"""One cache, several buckets: a view of the store whose keys live under one namespace (endpoint and bucket).

Each site's service sees plain S3 keys; the store underneath sees "<namespace><key>", so the same key in two
buckets never collides, two sites on one bucket share their entries, and a purge of one site's prefix never
reaches another bucket's entries. Entries coming out carry the S3 key again.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import BinaryIO

from .config import S3Config
from .models import Entry, HeldBody, ObjectMeta
from .store import CacheStore, Flight, Published, Staging

__all__ = ["NamespacedStore", "namespace_for"]


def namespace_for(s3: S3Config) -> str:
    """A short, fixed-length tag for (endpoint, bucket): a key may hold any character, a digest never a '/'."""
    origin = f"{s3.endpoint_url or 'aws'}\n{s3.region if not s3.endpoint_url else ''}\n{s3.bucket}"
    return hashlib.sha256(origin.encode()).hexdigest()[:16] + "/"


class NamespacedStore:
    """The CacheStore methods the driver uses, with keys moved under `namespace`."""

    def __init__(self, store: CacheStore, namespace: str) -> None:
        self._store = store
        self._ns = namespace
        self._committed: list[Callable[[Entry], None]] = []

    def on_commit(self, callback: Callable[[Entry], None]) -> None:
        """Call `callback(entry)` after each body committed through this view (variants.py starts there)."""
        self._committed.append(callback)

    @property
    def available(self) -> bool:
        return self._store.available

    def _in(self, entry: Entry) -> Entry:
        return replace(entry, key=self._ns + entry.key)

    def _out(self, entry: Entry | None) -> Entry | None:
        return None if entry is None else replace(entry, key=entry.key[len(self._ns):])

    async def lookup(self, key: str) -> Entry | None:
        return self._out(await self._store.lookup(self._ns + key))

    def on_memory_dropped(self, listener: Callable[[], None]) -> None:
        self._store.on_memory_dropped(listener)

    def fresh_in_memory(self, key: str, ttl: float, now: float) -> tuple[Entry, HeldBody] | None:
        """CacheStore.fresh_in_memory. The entry keeps its namespaced key: no copy per hit."""
        return self._store.fresh_in_memory(self._ns + key, ttl, now)

    async def open_body(self, entry: Entry, *, hit: bool = True) -> BinaryIO | HeldBody | None:
        return await self._store.open_body(self._in(entry), hit=hit)

    async def close_body(self, handle: BinaryIO | HeldBody) -> None:
        await self._store.close_body(handle)

    def variant_in_memory(self, key: str, etag: str, coding: str) -> HeldBody | None:
        return self._store.variant_in_memory(self._ns + key, etag, coding)

    async def open_variant(self, key: str, etag: str, coding: str) -> BinaryIO | HeldBody | None:
        return await self._store.open_variant(self._ns + key, etag, coding)

    async def stored_variants(self, key: str, etag: str) -> frozenset[str]:
        return await self._store.stored_variants(self._ns + key, etag)

    async def put_variant(self, key: str, etag: str, coding: str, data: bytes) -> bool:
        return await self._store.put_variant(self._ns + key, etag, coding, data)

    def fill_lock(self, key: str) -> contextlib.AbstractAsyncContextManager[Flight]:
        return self._store.fill_lock(self._ns + key)

    def publish(self, staging: Staging, *, verified: bool = False) -> None:
        self._store.publish(staging, verified=verified)  # staging.key is already namespaced: `stage` made it

    async def committing_elsewhere(self, key: str) -> bool:
        return await self._store.committing_elsewhere(self._ns + key)

    @staticmethod
    def finished(fill: Published) -> bool:
        return CacheStore.finished(fill)

    async def follow(self, key: str, fill: Published) -> Staging | None:
        return await self._store.follow(self._ns + key, fill)

    async def adopt(self, entry: Entry) -> Staging | None:
        return await self._store.adopt(self._in(entry))

    async def stage(self, key: str, meta: ObjectMeta) -> Staging:
        return await self._store.stage(self._ns + key, meta)

    async def write(self, staging: Staging, chunk: bytes) -> None:
        await self._store.write(staging, chunk)

    async def flush(self, staging: Staging) -> None:
        await self._store.flush(staging)

    async def commit(self, staging: Staging, now: float) -> Entry | None:
        entry = self._out(await self._store.commit(staging, now))
        if entry is not None:
            for callback in self._committed:
                callback(entry)
        return entry

    async def discard(self, staging: Staging) -> None:
        await self._store.discard(staging)

    async def mark_checked(self, entry: Entry) -> bool:
        return await self._store.mark_checked(self._in(entry))

    async def forget(self, key: str) -> int:
        return await self._store.forget(self._ns + key)

    async def keys(self, prefix: str) -> list[str]:
        return [key[len(self._ns):] for key in await self._store.keys(self._ns + prefix)]

    async def purge_prefix(self, prefix: str) -> int:
        return await self._store.purge_prefix(self._ns + prefix)

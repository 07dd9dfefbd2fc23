"""Values shared by the modules: object metadata, cache entries, outcomes and the clock."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import Protocol

__all__ = ["Clock", "Entry", "HeldBody", "ObjectMeta", "Outcome"]

_MD5_ETAG = re.compile(r'^"[0-9a-fA-F]{32}"$')


# A small body held in a worker's memory: a read-only mapping of its cache file (store.py), so that workers
# holding the same body share one copy, the page cache's; bytes where there is no file (b"" for an empty one).
HeldBody = bytes | memoryview


class Clock(Protocol):
    def __call__(self) -> float: ...


class Outcome(enum.Enum):
    HIT = "HIT"
    MISS = "MISS"
    REVALIDATED = "REVALIDATED"
    STALE = "STALE"


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What S3 said about one version of an object."""

    etag: str  # verbatim, quoted, as S3 sends it
    size: int
    last_modified: float | None  # epoch seconds; HTTP dates have whole-second precision
    headers: tuple[tuple[str, str], ...] = ()  # forwarded representation headers, canonical names
    encrypted: bool = False  # SSE-KMS or SSE-C: the ETag is not an MD5 of the body
    redirect: str = ""  # x-amz-website-redirect-location: S3 website hosting answers 301 to it

    @property
    def md5(self) -> str | None:
        """The body's MD5 when the ETag is one (single-part, not KMS/SSE-C; docs/reliability.md §0.2)."""
        if self.encrypted or not _MD5_ETAG.match(self.etag):
            return None
        return self.etag[1:-1].lower()


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached object: its metadata and when S3 last confirmed it."""

    key: str
    meta: ObjectMeta
    checked_at: float

    def checked(self, meta: ObjectMeta, now: float) -> Entry:
        return replace(self, meta=meta, checked_at=now)

"""Pure: the headers of an object response (representation headers from S3, validators, cache status)."""

from __future__ import annotations

import email.utils

from multidict import CIMultiDict, CIMultiDictProxy

from .models import ObjectMeta, Outcome

__all__ = ["CACHE_STATUS", "NOT_MODIFIED_HEADERS", "object_headers"]

# RFC 9110 §15.4.5: a 304 carries the validators and caching headers a 200 would.
NOT_MODIFIED_HEADERS = frozenset({"ETag", "Last-Modified", "Cache-Control", "Expires", "Content-Location",
                                  "X-Cache", "Age", "Cache-Status"})
CACHE_STATUS = "cachingproxy"


def object_headers(meta: ObjectMeta, outcome: Outcome, age: int, left: int | None) -> CIMultiDictProxy[str]:
    """What a response for this version of an object says about it, given its outcome, Age and TTL left."""
    headers: CIMultiDict[str] = CIMultiDict(meta.headers)
    headers.setdefault("Content-Type", "binary/octet-stream")  # what S3 itself sends without one
    if meta.etag:
        headers["ETag"] = meta.etag
    if meta.last_modified is not None:
        headers["Last-Modified"] = email.utils.formatdate(meta.last_modified, usegmt=True)
    headers["Accept-Ranges"] = "bytes"
    headers["X-Cache"] = outcome.value
    headers["Age"] = str(age)
    status = {
        Outcome.HIT: f"hit; ttl={left}",
        Outcome.REVALIDATED: f"fwd=stale; fwd-status=304; ttl={left}",
        Outcome.STALE: f"hit; ttl={left}; detail=stale-if-error",
    }.get(outcome, "fwd=miss; fwd-status=200")
    headers["Cache-Status"] = f"{CACHE_STATUS}; {status}"
    return CIMultiDictProxy(headers)

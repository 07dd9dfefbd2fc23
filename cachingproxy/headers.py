"""Pure: the headers of an object response (representation headers from S3, validators, cache status, and
the freshness browsers are told: freshness.py)."""

from __future__ import annotations

import email.utils

from multidict import CIMultiDict, CIMultiDictProxy

from .freshness import ClientFreshness, stored_date, toward_client
from .models import ObjectMeta, Outcome

__all__ = ["CACHE_STATUS", "NOT_MODIFIED_HEADERS", "SERVER", "not_modified", "object_headers"]

# RFC 9110 §15.4.5: a 304 carries the validators and caching headers a 200 would.
NOT_MODIFIED_HEADERS = frozenset({"ETag", "Last-Modified", "Cache-Control", "Expires", "Content-Location",
                                  "X-Cache", "Age", "Cache-Status", "Date", "Vary"})
CACHE_STATUS = "cachingproxy"
SERVER = "cachingproxy"  # every response's Server header (app.py makes aiohttp send it too)


def object_headers(meta: ObjectMeta, outcome: Outcome, age: int, left: int | None, checked: int | None,
                   client: ClientFreshness) -> CIMultiDictProxy[str]:
    """What a response for this version of an object says about it, given its outcome, Age and TTL left.

    `checked`: when S3 last gave us these headers (whole seconds), sent as the stored Date beside Age
    (RFC 9111 §4.2.3); None for a miss, which gets aiohttp's Date (now). `client`: the Cache-Control
    browsers get when S3 sent none (freshness.toward_client).
    """
    headers: CIMultiDict[str] = CIMultiDict(toward_client(meta.headers, client))
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
    if checked is not None:
        # After Age: httplint (REDbot) reads Age while checking Date only if Age came first, and otherwise
        # reports a correct stored Date as a wrong server clock. Field order carries no meaning (RFC 9110 §5.3).
        headers["Date"] = stored_date(checked)
    return CIMultiDictProxy(headers)


def not_modified(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """What a 304 keeps of a 200's headers (NOT_MODIFIED_HEADERS)."""
    return CIMultiDict((k, v) for k, v in headers.items() if k in NOT_MODIFIED_HEADERS)

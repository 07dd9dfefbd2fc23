"""Pure: what a response tells its client about freshness (RFC 9111), and the header set of a 404.

Three layers decide how current a page is (README, "Three layers of freshness"): the publisher's own
`Cache-Control` on the S3 object; the proxy's TTL (`[cache] ttl` and `[[cache.rules]]`), after which it asks S3
again; and what browsers are told, which is S3's `Cache-Control` when there is one, otherwise
`client_cache_control` (a rule's, else `[cache]`'s). Without that last layer a response with `Last-Modified`
and no `Cache-Control` lets every browser pick its own heuristic lifetime (RFC 9111 §4.2.2: typically a tenth
of the time since the last change), so a page changed today could stay stale in browsers for days.

A response served from the cache carries the `Date` of the moment the proxy last had the object's headers
from S3 (its fetch or its last revalidation) and `Age` = now minus that moment (RFC 9111 §4.2.3, §5.1): the
current time beside a non-zero Age would tell clients the response is older than it is (REDbot's "Date
header has been changed by an intermediary").
"""

from __future__ import annotations

import email.utils
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config import CacheRule
from .policy import glob_regex

__all__ = [
    "REDIRECT_CACHE_CONTROL",
    "UNVALIDATED_CACHE_CONTROL",
    "ClientFreshness",
    "age",
    "client_freshness",
    "not_found_headers",
    "redirect_cache_control",
    "stored_date",
    "toward_client",
]

# A redirect (`dir` -> `dir/`, the bare mount) has no validator, so "no-cache" would make a browser store
# something it can only refetch in full (REDbot: FRESHNESS_NO_CACHE_NO_VALIDATOR): "no-store" has the same
# effect, every view asks the proxy, which answers from memory, and says so honestly. Without any
# Cache-Control a browser may keep a 301 for ever (RFC 9111 §4.2.2), and the folder may later become a file.
REDIRECT_CACHE_CONTROL = "no-store"
# The same holds for anything else the proxy makes up without a validator (folder listings).
UNVALIDATED_CACHE_CONTROL = "no-store"
# Headers that state freshness: S3 sending either one is the publisher's decision, which wins over ours.
_FRESHNESS = frozenset({"cache-control", "expires"})
# What a 404 built on the error document keeps of that object's headers: how to read the body, nothing that
# describes the error document as a resource (validators, freshness), since the 404 is about another URL.
_NOT_FOUND_KEPT = frozenset({"content-type", "content-language", "content-encoding"})


@dataclass(frozen=True, slots=True)
class ClientFreshness:
    """The Cache-Control to send when S3 gave none; with `override`, sent instead of S3's. `redirect`: what the
    object gets instead when it is a website redirect (x-amz-website-redirect-location)."""

    cache_control: str
    override: bool = False
    redirect: str = REDIRECT_CACHE_CONTROL


def client_freshness(relative_key: str, rules: Sequence[CacheRule], default: str) -> ClientFreshness:
    """The first rule that sets `client_cache_control` and matches the key below `[s3] prefix`, else `default`."""
    for rule in rules:
        if rule.client_cache_control is not None and glob_regex(rule.match).match(relative_key):
            return _freshness(rule.client_cache_control, rule.override, rule.client_cache_control)
    return _freshness(default, False, REDIRECT_CACHE_CONTROL)


@functools.lru_cache(maxsize=64)
def _freshness(cache_control: str, override: bool, redirect: str) -> ClientFreshness:
    # One instance per configured value: every hit passes it to hitpath.memo_headers, and a hash of an
    # existing object is cheaper than building a new one per request. Values come from config only.
    return ClientFreshness(cache_control, override, redirect)


def redirect_cache_control(relative_key: str, rules: Sequence[CacheRule]) -> str:
    """A redirect's Cache-Control: a matching rule's `client_cache_control`, else REDIRECT_CACHE_CONTROL."""
    for rule in rules:
        if rule.client_cache_control is not None and glob_regex(rule.match).match(relative_key):
            return rule.client_cache_control
    return REDIRECT_CACHE_CONTROL


def toward_client(headers: tuple[tuple[str, str], ...], freshness: ClientFreshness) -> tuple[tuple[str, str], ...]:
    """The object's forwarded headers with the Cache-Control browsers get.

    S3's `Cache-Control` or `Expires` is kept (RFC 9111 §5.3: either is an explicit lifetime) unless the rule
    says `override`, which drops both and sends the rule's value.
    """
    explicit = any(name.lower() in _FRESHNESS for name, _ in headers)
    if explicit and not freshness.override:
        return headers
    kept = tuple((name, value) for name, value in headers if name.lower() not in _FRESHNESS)
    return (*kept, ("Cache-Control", freshness.cache_control))


def stored_date(checked_at: float) -> str:
    """The `Date` of a stored response: when S3 last gave us its headers (RFC 9110 §6.6.1 whole seconds)."""
    return email.utils.formatdate(math.floor(checked_at), usegmt=True)


def age(checked_at: float, now: float) -> int:
    """`Age` (RFC 9111 §5.1) such that Date + Age is the current second; never negative (a clock step back)."""
    return max(0, math.floor(now) - math.floor(checked_at))


def not_found_headers(headers: tuple[tuple[str, str], ...], negative_ttl: float,
                      cache_name: str) -> tuple[tuple[str, str], ...]:
    """A 404's headers, with or without the error document (`headers` is its forwarded set, or ()).

    No ETag, Last-Modified or Accept-Ranges: those describe the error document, and a client holding them
    would send If-None-Match or Range for a URL whose answer is "absent" (RFC 9110 §13.2.1: preconditions
    apply to 2xx only, so a 404 is always sent whole). The lifetime is how long the proxy itself trusts the
    absence (`negative_ttl`), whatever the error document's own Cache-Control says.
    """
    kept = tuple((name, value) for name, value in headers if name.lower() in _NOT_FOUND_KEPT)
    if headers and not any(name.lower() == "content-type" for name, _ in kept):
        kept = (*kept, ("Content-Type", "binary/octet-stream"))  # what S3 itself sends without one
    return (*kept, ("Cache-Control", f"max-age={math.floor(negative_ttl)}"),
            ("Cache-Status", f"{cache_name}; fwd=uri-miss; fwd-status=404"))

"""Pure freshness policy: what to do with a cache entry at a given time. Time is always an argument."""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .config import CacheConfig, CacheRule
from .models import Entry

__all__ = [
    "Action",
    "Breaker",
    "Confirm",
    "Fail",
    "Fetch",
    "Health",
    "Revalidate",
    "Serve",
    "ServeAndRefresh",
    "ServeStale",
    "Windows",
    "decide",
    "glob_regex",
    "is_fresh",
    "may_serve_stale",
    "ttl_for",
    "ttl_left",
    "windows_for",
    "within",
]

# RFC 9111 §4.2.4: a response carrying one of these must not be served stale, whatever our config says.
_NO_STALE = re.compile(r"(?:^|,)\s*(?:no-cache|must-revalidate|proxy-revalidate|s-maxage)\b", re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """`**` crosses "/", `*` and `?` do not (the usual doc-tool glob, unlike fnmatch)."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def ttl_for(relative_key: str, rules: Sequence[CacheRule], default: float) -> float:
    """The first rule that sets a ttl and whose glob matches the key below `[s3] prefix` wins; otherwise
    `[cache] ttl`."""
    for rule in rules:
        if rule.ttl is not None and glob_regex(rule.match).match(relative_key):
            return rule.ttl
    return default


def ttl_left(entry: Entry, ttl: float, now: float) -> float:
    """Seconds of freshness left; negative once stale (RFC 9211 `ttl` parameter)."""
    return entry.checked_at + ttl - now


def may_serve_stale(entry: Entry, ttl: float, stale_if_error: float, now: float) -> bool:
    """Stale-if-error (RFC 5861 §4) within the configured window, unless the object forbids it."""
    cache_control = dict(entry.meta.headers).get("Cache-Control", "")
    if _NO_STALE.search(cache_control):
        return False
    return -ttl_left(entry, ttl, now) <= stale_if_error


def within(entry: Entry, ttl: float, window: float, now: float) -> bool:
    """Whether a stale entry is less than `window` seconds past its TTL (RFC 5861 §3 stale-while-revalidate)."""
    return window > 0 and -ttl_left(entry, ttl, now) < window


class Health(enum.Enum):
    """What the driver knows of S3 when it asks for a decision."""

    UP = "up"  # no reason to doubt it: waiting on S3 is worth it
    SHUNNED = "shunned"  # the breaker is open: nobody who has a copy should wait on S3
    FAILED = "failed"  # the call just made for this request failed (5xx, refused, reset)
    TIMED_OUT = "timed out"  # the call just made for this request timed out


@dataclass(frozen=True, slots=True)
class Windows:
    """The per-object settings a decision needs."""

    ttl: float
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0


@dataclass(frozen=True, slots=True)
class Serve:
    """Fresh: answer from disk, no S3 request."""


@dataclass(frozen=True, slots=True)
class ServeAndRefresh:
    """Stale but within stale-while-revalidate (RFC 5861 §3): answer now, revalidate in the background."""


@dataclass(frozen=True, slots=True)
class Revalidate:
    """Stale: one HeadObject decides."""


@dataclass(frozen=True, slots=True)
class Fetch:
    """Nothing usable cached: GetObject."""


@dataclass(frozen=True, slots=True)
class Confirm:
    """A listing reports the cached ETag: the entry is as fresh as after a 304 (warm-up)."""


@dataclass(frozen=True, slots=True)
class ServeStale:
    """S3 failed or is shunned and the copy may be served stale (RFC 5861 §4 stale-if-error)."""


@dataclass(frozen=True, slots=True)
class Fail:
    """Nothing to serve: answer with this status."""

    status: int  # 502 or 504


Action = Serve | ServeAndRefresh | Revalidate | Fetch | Confirm | ServeStale | Fail


def is_fresh(entry: Entry, ttl: float, now: float) -> bool:
    # A clock that stepped backwards (NTP) must not keep an entry fresh for ever.
    return entry.checked_at <= now and ttl_left(entry, ttl, now) > 0


def windows_for(relative_key: str, cache: CacheConfig, cap: float | None = None) -> Windows:
    """The TTL rule for a key below `[s3] prefix`, with the stale windows of `[cache]`.

    `cap`: a TTL no entry may exceed just now ([events] fallback_ttl while the events consumer cannot read its
    queue: the long TTL that events allow is only safe while changes are being heard of)."""
    ttl = ttl_for(relative_key, cache.rules, cache.ttl)
    if cap is not None:
        ttl = min(ttl, cap)
    return Windows(ttl, cache.stale_while_revalidate, cache.stale_if_error)


def decide(entry: Entry | None, now: float, windows: Windows, health: Health = Health.UP, *,
           listed_etag: str | None = None) -> Action:
    """The whole cache decision, one row per case (tests/test_policy.py tabulates every row).

    `listed_etag`: a warm-up's ListObjectsV2 reported this ETag for the key. `health`: see `Health`; with
    nothing cached S3 is asked whatever the breaker says, since there is nothing else to answer with (a lone
    upstream, as nginx treats it), and only a failure that already happened ends in `Fail`.
    """
    failed = health in (Health.FAILED, Health.TIMED_OUT)
    if entry is None:
        if failed:
            return Fail(504 if health is Health.TIMED_OUT else 502)
        return Fetch()
    if listed_etag is not None:
        return Confirm() if listed_etag == entry.meta.etag else Fetch()
    if is_fresh(entry, windows.ttl, now) and not failed:
        return Serve()
    if failed or health is Health.SHUNNED:
        if may_serve_stale(entry, windows.ttl, windows.stale_if_error, now):
            return ServeStale()
        if failed:
            return Fail(504 if health is Health.TIMED_OUT else 502)
        return Revalidate()  # shunned, but no copy may be served: asking is all that is left
    if within(entry, windows.ttl, windows.stale_while_revalidate, now):
        return ServeAndRefresh()
    return Revalidate()


class Breaker:
    """After `threshold` consecutive S3 failures, S3 is shunned for `cooldown` seconds: requests that have a
    copy to serve stale answer at once instead of waiting on a timeout (Varnish saint mode). After the cooldown
    the next call is the probe, and the rest keep being answered from the cache while it runs. Requests with
    nothing to serve ask S3 regardless (`policy.decide`), and any success closes the breaker at once.
    """

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold  # 0 = never open
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None

    def health(self, now: float) -> Health:
        if self.opened_at is None or now - self.opened_at >= self.cooldown:
            return Health.UP
        return Health.SHUNNED

    def sending(self, now: float) -> None:
        """A call is going out; past the cooldown it is the probe, so shun again until it has answered."""
        if self.opened_at is not None and now - self.opened_at >= self.cooldown:
            self.opened_at = now

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.threshold and self.failures >= self.threshold:
            self.opened_at = now

"""Pure freshness policy: what to do with a cache entry at a given time. Time is always an argument."""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence

from .config import CacheRule
from .models import Entry

__all__ = ["Action", "Breaker", "decide", "glob_regex", "may_serve_stale", "ttl_for", "ttl_left", "within"]

# RFC 9111 §4.2.4: a response carrying one of these must not be served stale, whatever our config says.
_NO_STALE = re.compile(r"(?:^|,)\s*(?:no-cache|must-revalidate|proxy-revalidate|s-maxage)\b", re.IGNORECASE)


class Action(enum.Enum):
    SERVE = "serve"  # fresh: answer from disk, no S3 request
    REVALIDATE = "revalidate"  # stale: one HeadObject decides
    FETCH = "fetch"  # nothing cached: GetObject


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
    """The first rule whose glob matches the key below `[s3] prefix` wins; otherwise `[cache] ttl`."""
    for rule in rules:
        if glob_regex(rule.match).match(relative_key):
            return rule.ttl
    return default


def ttl_left(entry: Entry, ttl: float, now: float) -> float:
    """Seconds of freshness left; negative once stale (RFC 9211 `ttl` parameter)."""
    return entry.checked_at + ttl - now


def decide(entry: Entry | None, ttl: float, now: float) -> Action:
    if entry is None:
        return Action.FETCH
    # A clock that stepped backwards (NTP) must not keep an entry fresh forever.
    if now < entry.checked_at or ttl_left(entry, ttl, now) <= 0:
        return Action.REVALIDATE
    return Action.SERVE


def may_serve_stale(entry: Entry, ttl: float, stale_if_error: float, now: float) -> bool:
    """Stale-if-error (RFC 5861 §4) within the configured window, unless the object forbids it."""
    cache_control = dict(entry.meta.headers).get("Cache-Control", "")
    if _NO_STALE.search(cache_control):
        return False
    return -ttl_left(entry, ttl, now) <= stale_if_error


def within(entry: Entry, ttl: float, window: float, now: float) -> bool:
    """Whether a stale entry is less than `window` seconds past its TTL (RFC 5861 §3 stale-while-revalidate)."""
    return window > 0 and -ttl_left(entry, ttl, now) < window


class Breaker:
    """After `threshold` consecutive S3 failures, stop asking S3 for `cooldown` seconds, then let one probe
    through (Varnish saint mode, RELIABILITY.md §1): during an outage no request waits on a timeout.
    """

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold  # 0 = never open
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None

    def allow(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if now - self.opened_at >= self.cooldown:
            self.opened_at = now  # half-open: this caller is the probe; the rest wait another cooldown
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.threshold and self.failures >= self.threshold:
            self.opened_at = now

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

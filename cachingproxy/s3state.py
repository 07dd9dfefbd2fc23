"""What a check of the bucket found, what the log says about it, and what /readyz answers: pure.

A wrong bucket name, an unreachable endpoint and missing or rejected credentials all used to start quietly
and print "serving"; every page was then a 404 or a 502 with nothing in the log. At start the proxy checks
the bucket once (monitoring.Ops.s3_check: one 1-key ListObjectsV2) and logs one line per problem, then
keeps starting, since the cache may still serve. /readyz reports the same check.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import S3Config

__all__ = ["EveryMinute", "S3Check", "S3State", "endpoint", "problem", "readiness"]


class S3State(enum.Enum):
    OK = "ok"
    UNREACHABLE = "unreachable"  # refused, timed out, 5xx: may pass, a retry can fix it
    DENIED = "denied"  # credentials missing or rejected: configuration, a retry will not fix it
    NO_SUCH_BUCKET = "no such bucket"  # configuration too


@dataclass(frozen=True, slots=True)
class S3Check:
    state: S3State
    detail: str = ""  # S3's error code or the failure's kind: "InvalidAccessKeyId", "timeout", ...


def endpoint(s3: S3Config) -> str:
    """Where the bucket is, for the log (never credentials)."""
    return s3.endpoint_url or f"AWS S3 ({s3.region})"


def problem(check: S3Check, s3: S3Config) -> str | None:
    """One log line for what the check found, or None when there is nothing to say."""
    where = f'bucket "{s3.bucket}" at {endpoint(s3)}'
    match check.state:
        case S3State.OK if check.detail == "AccessDenied":
            return (f"{where}: listing denied (AccessDenied): reads may work, but without s3:ListBucket a missing "
                    "key looks like a denied one")
        case S3State.OK:
            return None
        case S3State.NO_SUCH_BUCKET:
            return f"{where}: does not exist; every request not in the cache is answered 404 until it does"
        case S3State.DENIED if check.detail == "NoCredentialsError":
            return (f"{where}: no credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an "
                    "instance role); serving only what is cached")
        case S3State.DENIED:
            return f"{where}: credentials rejected ({check.detail}); serving only what is cached"
        case S3State.UNREACHABLE:
            return f"{where}: endpoint unreachable ({check.detail}); serving from the cache until it answers"


def readiness(cache_ok: bool, cached: bool, s3: S3State) -> tuple[int, str, str]:
    """/readyz: (status, word, reason). Ready means "can serve".

    200 "degraded" only while S3 is unreachable (which may pass) and there is a cache to serve from, or while
    the cache is down and S3 serves; 503 when there is nothing to serve, and when the failure is one of
    configuration (no such bucket, credentials denied), which waiting will not fix.
    """
    match s3:
        case S3State.OK:
            return (200, "ready", "") if cache_ok else (200, "degraded", "cache unavailable: serving from S3")
        case S3State.UNREACHABLE if cache_ok and cached:
            return 200, "degraded", "S3 unreachable: serving from the cache"
        case S3State.UNREACHABLE:
            return 503, "unavailable", "S3 unreachable and nothing cached to serve"
        case S3State.DENIED:
            return 503, "unavailable", "S3 denied the proxy's credentials"
        case S3State.NO_SUCH_BUCKET:
            return 503, "unavailable", "the bucket does not exist"


class EveryMinute:
    """Says yes at most once a minute: for a log line that every request would otherwise repeat."""

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last: float | None = None

    def due(self, now: float) -> bool:
        if self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        return True

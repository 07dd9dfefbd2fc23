"""The access log's lines, pure: one JSON object per line (the default), or Apache/nginx "combined".

A line is always shorter than PIPE_BUF (4096 bytes): a single write of it to a pipe is atomic (pipe(7)), so
lines from several workers sharing one stderr never interleave within a line (logsetup.AtomicLines writes
whole lines only). Paths and user agents that would make a line longer are cut, and the line says so.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import time
from collections.abc import Mapping

__all__ = ["FORMATS", "LINE_LIMIT", "combined_line", "json_line", "json_stem", "new_request_id", "request_id_from",
           "rfc3339_ms", "stem_line"]

FORMATS = ("json", "combined", "off")  # [server] access_log
LINE_LIMIT = 4096 - 1  # PIPE_BUF on Linux, less the newline
_CUT_PATH, _CUT_AGENT = 256, 128  # what is kept of each when a line would be too long (JSON escapes: <= 6x)
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: no trailing newline either (JSON would escape it)
_PREFIX = os.urandom(4).hex()  # per process; forked workers draw their own (new_request_id re-checks the pid)
_COUNTER = itertools.count(1)
_PID = os.getpid()


def new_request_id() -> str:
    """Unique across workers and restarts in practice: a random per-process prefix and a counter."""
    return f"{_PREFIX}-{next(_COUNTER):x}"


def _reseed() -> None:
    """In a forked child: a worker must not repeat its parent's ids. A fork hook rather than a getpid() per id,
    which is a system call (glibc stopped caching it) and cost 3 % of a hot hit's samples under py-spy."""
    global _PREFIX, _COUNTER, _PID
    _PREFIX, _COUNTER, _PID = os.urandom(4).hex(), itertools.count(1), os.getpid()


os.register_at_fork(after_in_child=_reseed)


def request_id_from(header: str | None) -> str:
    """A front proxy's X-Request-Id when it is a plain token (it then ties both logs together), else a new one."""
    if header and _ID.fullmatch(header):
        return header
    return new_request_id()


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def rfc3339_ms(when: float) -> str:
    """`2026-12-03T08:40:12.345Z` (RFC 3339, UTC, milliseconds)."""
    second = int(when)
    return f"{_second(second)}.{int((when - second) * 1000):03d}Z"


def json_line(*, when: float, site: str, client: str, method: str, path: str, status: int, size: int, cache: str,
              ms: float, s3: Mapping[str, int], user_agent: str, request_id: str) -> str:
    """One JSON object, keys in a fixed order; formatted by hand: json.dumps of a dict cost more than the rest
    of a cached hit's logging. `request_id` is a token of at most 64 characters (request_id_from)."""
    stem = json_stem(site=site, client=client, method=method, path=path, status=status, size=size, cache=cache,
                     s3=s3, user_agent=user_agent)
    return stem_line(*stem, when, ms, json.dumps(request_id))


def json_stem(*, site: str, client: str, method: str, path: str, status: int, size: int, cache: str,
              s3: Mapping[str, int], user_agent: str) -> tuple[str, str]:
    """All of json_line's line but its time, latency and id: what a caller writing many lines for the same
    request shape keeps (fasthit.py), to finish each with `stem_line`."""
    calls = json.dumps(dict(s3), separators=(",", ":")) if s3 else "{}"
    if cache != "HIT":  # a miss, a 404 or a revalidation is not repeated at once: only hits fill the memo
        return _stem.__wrapped__(site, client, method, path, status, size, cache, calls, user_agent)
    return _stem(site, client, method, path, status, size, cache, calls, user_agent)


def stem_line(middle: str, end: str, when: float, ms: float, quoted_id: str) -> str:
    """json_line from its `json_stem` and its request id already in JSON (a token needs only its quotes:
    request_id_from's ids have no character JSON escapes)."""
    return f'{{"time":"{rfc3339_ms(when)}"{middle}{ms:.1f}{end}{quoted_id}}}'


_ID_ROOM = len('{"time":"2026-12-03T08:40:12.345Z"') + 12 + 66 + 1  # the time, ms up to 11 digits, an id, "}"


# 1024: a docs site's hot set of paths many times over. Hits only (json_stem): a stream of new paths (crawlers,
# 404s, cold fills) kept it filling for minutes, at 4096 for the whole of a 10-minute run (benchmarks/results/
# footprint.md).
@functools.lru_cache(maxsize=1024)
def _stem(site: str, client: str, method: str, path: str, status: int, size: int, cache: str, calls: str,
          user_agent: str) -> tuple[str, str]:
    """What a line holds besides its time, latency and id, encoded once: a hot object's lines repeat it, and
    encoding six strings was a third of a fast hit's logging. Bounded, so unique hostile values only cycle it."""
    head = (f',"site":{json.dumps(site)},"client":{json.dumps(client)},"method":{json.dumps(method)},'
            f'"path":')
    tail = f',"status":{status},"bytes":{size},"cache":{json.dumps(cache)},"ms":'
    end = f',"s3":{calls},"ua":'
    middle, rest = f"{head}{json.dumps(path)}{tail}", f"{end}{json.dumps(user_agent)}"
    if len(middle) + len(rest) + _ID_ROOM <= LINE_LIMIT + 1:  # json.dumps escapes to ASCII: characters are bytes
        return middle, f'{rest},"id":'
    return (f"{head}{json.dumps(_cut(path, _CUT_PATH))}{tail}",
            f'{end}{json.dumps(_cut(user_agent, _CUT_AGENT))},"cut":true,"id":')


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f-\xff]|[^\x00-\xff]')


def _escaped(value: str) -> str:
    """nginx's escaping for its log lines: `"`, `\\`, control and non-ASCII characters as \\xHH (UTF-8 bytes)."""
    return _UNSAFE.sub(lambda m: "".join(f"\\x{b:02X}" for b in m[0].encode()), value)


def combined_line(*, when: float, client: str, method: str, path: str, version: str, status: int, size: int,
                  referer: str, user_agent: str) -> str:
    """Apache's and nginx's "combined" format, in UTC, so that existing log tooling reads it. No query string
    (it can carry tokens), in the request line or the referer."""
    t = time.gmtime(when)
    stamp = f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    referer = referer.partition("?")[0] or "-"

    def line(path: str, referer: str, user_agent: str) -> str:
        return (f'{client or "-"} - - [{stamp}] "{_escaped(method)} {_escaped(path)} {version}" {status} '
                f'{size or "-"} "{_escaped(referer)}" "{_escaped(user_agent or "-")}"')

    whole = line(path, referer, user_agent)
    if len(whole) <= LINE_LIMIT:  # _escaped leaves only ASCII: characters are bytes
        return whole
    # \xHH for each UTF-8 byte can make a character 16: cut hard as well, whatever is left.
    return line(_cut(path, _CUT_PATH), _cut(referer, _CUT_AGENT), _cut(user_agent, _CUT_AGENT))[:LINE_LIMIT]


def _cut(value: str, keep: int) -> str:
    return value if len(value) <= keep else value[:keep] + "..."

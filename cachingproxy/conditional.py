"""Conditional and range request evaluation (RFC 9110 §13 and §14), pure and stdlib-only.

`evaluate` turns a request's method and headers plus the cached object's validators into a `Plan`:
which status to answer with and which body bytes to send. It never raises on malformed input;
anything it cannot parse is ignored, as RFC 9110 asks of recipients.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["Plan", "evaluate"]

# A star entry sorts apart from any entity-tag: opaque tags always carry their DQUOTEs (§8.8.3).
_STAR = (False, "*")
# [0-9], not \d: \d also matches non-ASCII digits, which int() would happily accept (§14.1.1 uses DIGIT).
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")


@dataclass(frozen=True, slots=True)
class Plan:
    """What to answer: `status`, the body bytes [start, end) and the Content-Range value if any."""

    status: int  # 200, 206, 304, 412 or 416
    start: int = 0
    end: int = 0
    content_range: str | None = None  # "bytes 0-9/100" for 206, "bytes */100" for 416, else None


def evaluate(
    method: str, headers: Mapping[str, str], *, etag: str, last_modified: float | None, size: int
) -> Plan:
    """Evaluate preconditions in the order of RFC 9110 §13.2.2, then the Range header (§14.2).

    `headers` is case-insensitive in production; names are looked up with canonical capitalisation.
    `etag` is the quoted strong ETag as S3 sends it; `last_modified` is epoch seconds or None.
    Methods are case-sensitive (§9.1), so only "GET" and "HEAD" count as such.
    """
    # HTTP-dates have whole-second resolution (§5.6.7): compare against what Last-Modified said.
    lm = None if last_modified is None else math.floor(last_modified)
    own_weak = etag.startswith("W/")
    own_opaque = etag[2:] if own_weak else etag
    get_or_head = method in ("GET", "HEAD")

    # Step 1 (§13.1.1): If-Match uses the strong comparison; "*" matches any current representation.
    if_match = headers.get("If-Match")
    if if_match is not None:
        tags = _etag_list(if_match)
        if not any(t == _STAR or (not t[0] and not own_weak and t[1] == own_opaque) for t in tags):
            return Plan(412)
    # Step 2 (§13.1.4): If-Unmodified-Since only without If-Match; an invalid date is ignored. Without
    # a modification date there is nothing to compare against, so the header cannot fail.
    else:
        ius = _parse_date(headers.get("If-Unmodified-Since"))
        if ius is not None and lm is not None and lm > ius:
            return Plan(412)

    # Step 3 (§13.1.2): If-None-Match uses the weak comparison; a match means "not modified" for
    # GET/HEAD and a failed precondition for any other method.
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if any(t == _STAR or t[1] == own_opaque for t in _etag_list(if_none_match)):
            return Plan(304 if get_or_head else 412)
    # Step 4 (§13.1.3): If-Modified-Since only without If-None-Match, only for GET/HEAD.
    elif get_or_head:
        ims = _parse_date(headers.get("If-Modified-Since"))
        if ims is not None and lm is not None and lm <= ims:
            return Plan(304)

    full = Plan(200, 0, size)
    # Step 5 (§14.2): range handling is defined for GET only, so HEAD (and the rest) ignore Range.
    # An empty representation has no satisfiable int-range (§14.1.1); the server MAY ignore Range
    # (§14.2), which is friendlier than 416 for every client that always asks for a range.
    range_value = headers.get("Range")
    if method != "GET" or range_value is None or size == 0 or _repeated(headers, "Range"):
        return full
    # §13.1.5: If-Range is true only for a strong ETag equal to ours or a date exactly equal to
    # Last-Modified; a value whose first three characters hold a DQUOTE is an entity-tag.
    if_range = headers.get("If-Range")
    if if_range is not None:
        if_range = if_range.strip()
        if '"' in if_range[:3]:
            matches = not own_weak and if_range == etag
        else:
            date = _parse_date(if_range)
            matches = date is not None and lm is not None and date == lm
        if not matches:
            return full

    parsed = _parse_range(range_value)
    if parsed is None:
        return full
    first, last = parsed
    if first is None:  # suffix-range "-n": the last n bytes (§14.1.1)
        assert last is not None
        if last == 0:
            return Plan(416, content_range=f"bytes */{size}")
        start, end = max(size - last, 0), size
    else:
        if first >= size:  # §14.1.1: an int-range is satisfiable only if first-pos < length
            return Plan(416, content_range=f"bytes */{size}")
        start, end = first, size if last is None else min(last + 1, size)
    return Plan(206, start, end, f"bytes {start}-{end - 1}/{size}")


def _repeated(headers: Mapping[str, str], name: str) -> bool:
    """Whether a multidict holds `name` more than once. Range is not a list (RFC 9110 §14.2), so two field lines
    are invalid, and taking the first would be a guess at what the client meant: both are ignored (§14.2 lets a
    server ignore Range), as every other unparseable Range is. Only reached when a Range is present."""
    getall = getattr(headers, "getall", None)
    return getall is not None and len(getall(name)) > 1


def _parse_date(value: str | None) -> int | None:
    """An HTTP-date (§5.6.7) as epoch seconds, or None when absent or not a valid date."""
    # §13.1.3/§13.1.4: a value that looks like a list of dates is invalid; every HTTP-date form has
    # at most one comma, and parsedate would otherwise silently take the first date of a list.
    if value is None or value.count(",") > 1:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # asctime-date and "-0000" have no zone; HTTP-dates are GMT
        parsed = parsed.replace(tzinfo=UTC)
    return math.floor(parsed.timestamp())


def _etag_list(value: str) -> list[tuple[bool, str]]:
    """Entries of an If-Match / If-None-Match list as (weak, opaque-tag-with-quotes) pairs (§8.8.3).

    `*` becomes `_STAR`. Commas inside quotes do not split. Entries that are not entity-tags are
    dropped, so garbage never matches anything.
    """
    entries: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            entries.append("".join(current))
            current = []
        else:
            current.append(ch)
    entries.append("".join(current))

    tags: list[tuple[bool, str]] = []
    for raw in entries:
        entry = raw.strip()
        if entry == "*":
            tags.append(_STAR)
            continue
        weak = entry.startswith("W/")
        opaque = entry[2:] if weak else entry
        # opaque-tag = DQUOTE *etagc DQUOTE, and etagc excludes DQUOTE itself
        if len(opaque) >= 2 and opaque[0] == opaque[-1] == '"' and '"' not in opaque[1:-1]:
            tags.append((weak, opaque))
    return tags


def _parse_range(value: str) -> tuple[int | None, int | None] | None:
    """The single byte range in a Range value as (first, last), with first None for "-n".

    None means the header is to be ignored (§14.2): a unit other than bytes, more than one range
    (we do not send multipart/byteranges; S3 ignores such requests too), or an invalid spec.
    """
    unit, sep, range_set = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":  # range units are case-insensitive (§14.1)
        return None
    # §5.6.1: recipients ignore empty list elements, so "bytes=0-1," still holds exactly one range.
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if len(specs) != 1:
        return None
    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None:
        return None
    try:  # int() refuses over 4300 digits (CPython's str-to-int limit): treat as invalid, not crash
        first = int(match[1]) if match[1] else None
        last = int(match[2]) if match[2] else None
    except ValueError:
        return None
    if first is None and last is None:  # "bytes=-"
        return None
    if first is not None and last is not None and last < first:  # invalid int-range (§14.1.1)
        return None
    return first, last

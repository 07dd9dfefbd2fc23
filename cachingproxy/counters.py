"""Every counter the proxy keeps, declared once: `/stats`, `/metrics`, the dashboard and the CLI table all
derive from `COUNTERS`, so adding a counter is one line here and one `counters.add(...)` where it happens.

Counts live in the workers' shared tally (tally.py), so any worker reports the whole proxy. The S3 request
counters are also attributed to the HTTP request that caused them (`S3_CALLS`, read by the access log).
"""

from __future__ import annotations

import collections
import contextvars
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .tally import Tally

__all__ = [
    "COUNTERS", "FAMILIES", "NAMES", "NO_SITE", "S3_CALLS", "SITE", "Counter", "Counters", "cell_names", "nest",
    "site_cell",
]


@dataclass(frozen=True, slots=True)
class Counter:
    """One monotonically increasing count."""

    name: str  # the tally cell and the argument of Counters.add
    help: str  # /metrics HELP text and the dashboard's description
    stats: tuple[str, ...]  # its place in the /stats JSON: ("s3_requests", "GET") is stats["s3_requests"]["GET"]
    metric: str  # Prometheus family, after "cachingproxy_"; counters sharing one differ by `labels`
    section: str  # where the CLI table and the dashboard list it
    labels: tuple[tuple[str, str], ...] = ()
    unit: str = ""  # "bytes": shown as KiB/MiB by the CLI and the dashboard


COUNTERS: tuple[Counter, ...] = (
    Counter("hits", "Lookups answered from disk without asking S3.", ("hits",), "cache_hits", "Responses"),
    Counter("misses", "Lookups that needed a GetObject (or a HeadObject for HEAD).", ("misses",), "cache_misses",
            "Responses"),
    Counter("stale", "Responses served stale because S3 failed (stale-if-error) or while revalidating.",
            ("stale_served",), "stale_served", "Responses"),
    Counter("negative_hits", "Requests answered 404 from the negative cache.", ("negative_hits",), "negative_hits",
            "Responses"),
    Counter("unrouted", "Requests for a host and path that no site serves (404).", ("unrouted",),
            "unrouted_requests", "Responses"),
    Counter("bytes_served", "Object bytes sent to clients in complete responses.", ("bytes_served",), "served_bytes",
            "Responses", unit="bytes"),
    # Compression (variants.py): bytes sent in each content coding, and how many fewer than identity that was.
    Counter("bytes_br", "Object bytes sent brotli-compressed (included in bytes_served).", ("compression", "br"),
            "served_encoded_bytes", "Responses", (("encoding", "br"),), unit="bytes"),
    Counter("bytes_zstd", "Object bytes sent zstd-compressed (included in bytes_served).", ("compression", "zstd"),
            "served_encoded_bytes", "Responses", (("encoding", "zstd"),), unit="bytes"),
    Counter("bytes_gzip", "Object bytes sent gzip-compressed by us (included in bytes_served).",
            ("compression", "gzip"), "served_encoded_bytes", "Responses", (("encoding", "gzip"),), unit="bytes"),
    Counter("bytes_saved", "Bytes compression kept off the wire (identity size minus bytes sent).",
            ("compression", "saved"), "compression_saved_bytes", "Responses", unit="bytes"),
    Counter("s3_get", "GetObject requests sent to S3.", ("s3_requests", "GET"), "s3_requests", "S3",
            (("operation", "GET"),)),
    Counter("s3_head", "HeadObject requests sent to S3.", ("s3_requests", "HEAD"), "s3_requests", "S3",
            (("operation", "HEAD"),)),
    Counter("s3_list", "ListObjectsV2 requests sent to S3.", ("s3_requests", "LIST"), "s3_requests", "S3",
            (("operation", "LIST"),)),
    Counter("revalidated_unchanged", "HeadObject revalidations that found the same ETag.",
            ("revalidations", "unchanged"), "revalidations", "S3", (("result", "unchanged"),)),
    Counter("revalidated_changed", "HeadObject revalidations that found a new version.",
            ("revalidations", "changed"), "revalidations", "S3", (("result", "changed"),)),
    Counter("bytes_from_s3", "Object bytes received from S3.", ("bytes_from_s3",), "s3_received_bytes", "S3",
            unit="bytes"),
    Counter("integrity_failures", "S3 bodies rejected by the length or MD5 check.", ("integrity_failures",),
            "integrity_failures", "Cache"),
    Counter("cache_write_errors", "Bodies that could not be written to the cache.", ("cache_write_errors",),
            "cache_write_errors", "Cache"),
    Counter("events_received", "Object events read from the SQS queue.", ("events", "received"), "events",
            "Events", (("result", "received"),)),
    Counter("events_applied", "Object events applied to the cache (marked stale, refreshed or dropped).",
            ("events", "applied"), "events", "Events", (("result", "applied"),)),
    Counter("events_ignored", "Events or messages ignored: older or duplicate, for no site, test events.",
            ("events", "ignored"), "events", "Events", (("result", "ignored"),)),
    Counter("events_malformed", "Queue messages that could not be parsed (logged once, deleted).",
            ("events", "malformed"), "events", "Events", (("result", "malformed"),)),
    Counter("events_queue_errors", "Failed SQS receives and deletes (the consumer backs off and retries).",
            ("events", "queue_errors"), "event_queue_errors", "Events"),
)
# HELP for the Prometheus families that several labelled counters share.
FAMILIES = {
    "s3_requests": "Requests sent to S3, by operation.",
    "revalidations": "HeadObject revalidations, by result.",
    "events": "S3 event notifications from the SQS queue, by what became of them.",
    "served_encoded_bytes": "Object bytes sent in a content coding, by coding.",
}
NAMES = tuple(counter.name for counter in COUNTERS)
_S3_OPERATION = {c.name: dict(c.labels)["operation"] for c in COUNTERS if c.metric == "s3_requests"}

# S3 requests made on behalf of the current HTTP request, by operation (set by accesslog.track_s3_calls).
# Fills and revalidations run in tasks spawned by the request that started them, and tasks copy its context.
S3_CALLS: contextvars.ContextVar[collections.Counter[str] | None] = contextvars.ContextVar("s3_calls", default=None)


# The site the current request (or the warm job, fill or revalidation it started) is for; set by the handler.
SITE: contextvars.ContextVar[str | None] = contextvars.ContextVar("site", default=None)


NO_SITE = "-"  # counts made outside any site (requests no site matched); they still add up to the totals


def cell_names(sites: Iterable[str]) -> tuple[str, ...]:
    """The tally cells `Counters` needs: the totals, and each site's own."""
    return (*NAMES, *(site_cell(site, name) for site in (*sites, NO_SITE) for name in NAMES))


def site_cell(site: str, name: str) -> str:
    return f"{site}/{name}"


class Counters:
    """add(name) for the code that counts, totals() and by_site() for whoever reports."""

    def __init__(self, tally: Tally | None = None, sites: Iterable[str] = ()) -> None:
        self.sites = tuple(sites)
        self._tally = tally if tally is not None else Tally(cell_names(self.sites))
        self._cells = {site: {name: site_cell(site, name) for name in NAMES} for site in (*self.sites, NO_SITE)}
        self._pairs: dict[tuple[str, str], tuple[int, ...]] = {}  # (site, counter) -> its tally cells

    def add(self, name: str, amount: int = 1) -> None:
        pair = self.cells(SITE.get() or NO_SITE, name)
        # The total and the site's cell under one lock, by cell number: a hit counts twice or three times.
        self._tally.add_cells(pair, (amount,) * len(pair))
        operation = _S3_OPERATION.get(name)
        if operation is not None:
            calls = S3_CALLS.get()
            if calls is not None:
                calls[operation] += amount

    def cells(self, site: str, name: str) -> tuple[int, ...]:
        """The tally cells a count of `name` for `site` adds to (the total's and the site's), looked up once."""
        pair = self._pairs.get((site, name))
        if pair is None:
            cells = self._cells.get(site)
            pair = self._pairs[(site, name)] = (self._tally.cell(name),) + (
                (self._tally.cell(cells[name]),) if cells is not None else ())
        return pair

    def add_cells(self, cells: tuple[int, ...], amounts: tuple[int, ...]) -> None:
        """Adds by cell (`cells`, metrics.Metrics.observed) under one lock: a fast hit counts in one go."""
        self._tally.add_cells(cells, amounts)

    def get(self, name: str) -> int:
        """This worker's own count (tests)."""
        return self._tally.get(name)

    def totals(self) -> dict[str, int]:
        """Every counter summed over all workers."""
        totals = self._tally.totals()
        return {name: totals[name] for name in NAMES}

    def by_site(self) -> dict[str, dict[str, int]]:
        """Each site's counters (and NO_SITE's), summed over all workers."""
        totals = self._tally.totals()
        return {site: {name: totals[cell] for name, cell in cells.items()} for site, cells in self._cells.items()}


def nest(values: Mapping[str, int]) -> dict[str, Any]:
    """The counters as /stats shows them, each at its declared path."""
    out: dict[str, Any] = {}
    for counter in COUNTERS:
        *parents, leaf = counter.stats
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = values[counter.name]
    return out

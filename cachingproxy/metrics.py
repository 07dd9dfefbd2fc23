"""The proxy's figures: a `Snapshot` value for GET {admin}/stats, and its Prometheus exposition for GET
{admin}/metrics.

The only module that imports prometheus_client. Each app gets its own `CollectorRegistry`, never the global
one: tests build many apps in one process, and the global registry refuses a second metric of the same name.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .counters import COUNTERS, FAMILIES, NO_SITE, nest
from .tally import Tally

__all__ = ["CONTENT_TYPE", "EVENT_LAG_BUCKETS", "LATENCY_BUCKETS", "NO_SITE", "OUTCOMES", "Metrics", "Snapshot",
           "observe_event_lag", "slots"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
OUTCOMES = ("HIT", "MISS", "REVALIDATED", "STALE")  # X-Cache values; other responses are labelled "none"
FROM_CACHE = frozenset({"HIT", "REVALIDATED", "STALE"})
# Seconds. Hits from disk take about a millisecond, misses S3's latency plus the body.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LABELS = (*OUTCOMES, "none")
# Seconds from S3's event time to the moment the consumer applied it: SQS delivery plus the long poll.
EVENT_LAG_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
_LAG_SUM = "events.lag.sum_ms"


def _lag_bucket(index: int) -> str:
    return f"events.lag.{index}"  # index len(EVENT_LAG_BUCKETS) is +Inf


def observe_event_lag(tally: Tally, seconds: float) -> None:
    """One applied event's lag (events.py); kept in the shared tally like the request latency."""
    seconds = max(0.0, seconds)  # S3's clock and ours differ by a little
    tally.add(_lag_bucket(bisect.bisect_left(EVENT_LAG_BUCKETS, seconds)))
    tally.add(_LAG_SUM, round(seconds * 1e3))




def _responses(site: str, label: str) -> str:
    return f"responses.{site}.{label}"


def _bucket(site: str, label: str, index: int) -> str:
    return f"latency.{site}.{label}.{index}"  # index len(LATENCY_BUCKETS) is +Inf


def _sum_us(site: str, label: str) -> str:
    return f"latency.{site}.{label}.sum_us"


def slots(sites: Sequence[str]) -> tuple[str, ...]:
    """The tally cells this module counts into (workers share them: see tally.py)."""
    out: list[str] = []
    for site in (*sites, NO_SITE):
        out += [_responses(site, label) for label in OUTCOMES]
        out += [_bucket(site, label, i) for label in _LABELS for i in range(len(LATENCY_BUCKETS) + 1)]
        out += [_sum_us(site, label) for label in _LABELS]
    out += [_lag_bucket(i) for i in range(len(EVENT_LAG_BUCKETS) + 1)]
    out.append(_LAG_SUM)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every figure at one moment, as /stats and /metrics report it."""

    counters: Mapping[str, int]  # every name in counters.COUNTERS, summed over the workers
    sites: Mapping[str, Mapping[str, int]]  # the same, per site
    cache_available: bool
    entries: int
    bytes_on_disk: int
    size_limit: int
    uptime: float
    warm_jobs_running: int
    responses: Mapping[str, int] = field(default_factory=dict)  # object responses by X-Cache
    site_responses: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    config_loaded_at: float = 0.0  # when the configuration this worker serves was read (config.Config)
    config_hash: str = ""  # and the short hash of that file: tells a reload took

    @property
    def hit_ratio(self) -> float:
        return _ratio(self.responses)

    def as_json(self) -> dict[str, Any]:
        return {
            **nest(self.counters),
            # A fresh hit is a request S3 never saw.
            "s3_requests_saved": self.responses.get("HIT", 0),
            "responses": {o: self.responses.get(o, 0) for o in OUTCOMES},
            "hit_ratio": round(self.hit_ratio, 4),
            "entries": self.entries,
            "bytes_on_disk": self.bytes_on_disk,
            "size_limit": self.size_limit,
            "cache": "ok" if self.cache_available else "unavailable",
            "warm_jobs_running": self.warm_jobs_running,
            "uptime": round(self.uptime, 3),
            "config": {"loaded_at": round(self.config_loaded_at, 3), "hash": self.config_hash},
            "sites": {site: {**nest(values), "responses": dict(self.site_responses.get(site, {})),
                             "hit_ratio": round(_ratio(self.site_responses.get(site, {})), 4)}
                      for site, values in self.sites.items() if site != NO_SITE},
            # The declarations, for the dashboard's table of every counter (the CLI imports counters.py).
            "counters": [{"name": c.name, "help": c.help, "section": c.section, "unit": c.unit,
                          "value": self.counters[c.name]} for c in COUNTERS],
        }


def _ratio(responses: Mapping[str, int]) -> float:
    """Share of object responses answered from disk (X-Cache HIT, REVALIDATED or STALE)."""
    total = sum(responses.get(o, 0) for o in OUTCOMES)
    cached = sum(responses.get(o, 0) for o in FROM_CACHE)
    return cached / total if total else 0.0


class _SnapshotCollector(Collector):
    """Reads the snapshot `Metrics.render` was given; prometheus_client calls `collect` synchronously."""

    def __init__(self, owner: Metrics) -> None:
        self._owner = owner

    def describe(self) -> list[Metric]:
        return []  # names are dynamic per scrape; nothing to check against other collectors

    def collect(self) -> Iterator[Metric]:
        s = self._owner.current
        if s is None:
            return

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"cachingproxy_{name}", doc, value=value)

        families: dict[str, CounterMetricFamily] = {}
        for c in COUNTERS:
            family = families.get(c.metric)
            if family is None:
                family = families[c.metric] = CounterMetricFamily(
                    f"cachingproxy_{c.metric}", FAMILIES.get(c.metric, c.help),
                    labels=["site", *(name for name, _ in c.labels)])
            for site, values in s.sites.items():  # every count belongs to a site: their sum is the total
                family.add_metric([site, *(value for _, value in c.labels)], values[c.name])
        yield from families.values()
        yield gauge("cache_available", "1 when the disk cache is open.", 1 if s.cache_available else 0)
        yield gauge("cache_entries", "Cached objects.", s.entries)
        yield gauge("cache_bytes", "Bytes the cache uses on disk.", s.bytes_on_disk)
        yield gauge("cache_size_limit_bytes", "The configured cache size limit.", s.size_limit)
        yield gauge("hit_ratio", "Share of object responses answered from disk.", s.hit_ratio)
        yield gauge("warm_jobs_running", "Warm jobs in progress.", s.warm_jobs_running)
        yield gauge("uptime_seconds", "Seconds since the proxy started.", s.uptime)
        config = GaugeMetricFamily("cachingproxy_config_loaded_timestamp_seconds",
                                   "When the configuration in use was read (Unix time), labelled with its hash.",
                                   labels=["hash"])
        config.add_metric([s.config_hash], s.config_loaded_at)
        yield config
        yield self._owner.latency()
        yield self._owner.event_lag()


class Metrics:
    """observe(outcome, seconds, site) per response; render(snapshot) for a scrape. Counts live in the shared
    tally, so every worker reports the whole proxy's responses and latency histogram."""

    def __init__(self, tally: Tally, sites: Sequence[str]) -> None:
        self._tally = tally
        self._sites = (*sites, NO_SITE)
        self._cells: dict[tuple[str | None, str | None], tuple[tuple[int, ...], int, int | None]] = {}
        self.registry = CollectorRegistry()
        self.current: Snapshot | None = None
        self.registry.register(_SnapshotCollector(self))

    @property
    def responses(self) -> dict[str, int]:
        """Object responses by X-Cache, all sites."""
        totals = self._tally.totals()
        return {label: sum(totals[_responses(site, label)] for site in self._sites) for label in OUTCOMES}

    def site_responses(self) -> dict[str, dict[str, int]]:
        totals = self._tally.totals()
        return {site: {label: totals[_responses(site, label)] for label in OUTCOMES} for site in self._sites[:-1]}

    def observe(self, outcome: str | None, seconds: float, site: str | None) -> None:
        self._tally.add_cells(*self.observed(outcome, seconds, site))

    def observed(self, outcome: str | None, seconds: float, site: str | None
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The tally cells and amounts `observe` adds, for a caller that adds them with its own counts."""
        cells = self._cells.get((outcome, site))
        if cells is None:
            cells = self._cells[(outcome, site)] = self._cells_for(outcome, site)
        buckets, sum_us, responses = cells
        # Prometheus buckets are "le": a value equal to a bound belongs to that bucket.
        bucket = buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)]
        if responses is None:
            return (bucket, sum_us), (1, round(seconds * 1e6))
        return (bucket, sum_us, responses), (1, round(seconds * 1e6), 1)

    def _cells_for(self, outcome: str | None, site: str | None) -> tuple[tuple[int, ...], int, int | None]:
        """The tally cells one (outcome, site) pair counts into, looked up once: names built per response
        cost more than the adds."""
        label = outcome if outcome in OUTCOMES else "none"
        site = site if site in self._sites else NO_SITE
        buckets = tuple(self._tally.cell(_bucket(site, label, i)) for i in range(len(LATENCY_BUCKETS) + 1))
        responses = self._tally.cell(_responses(site, label)) if label != "none" else None
        return buckets, self._tally.cell(_sum_us(site, label)), responses

    def latency(self) -> HistogramMetricFamily:
        totals = self._tally.totals()
        family = HistogramMetricFamily("cachingproxy_request_duration_seconds",
                                       "Time to answer a request, by site and X-Cache outcome.",
                                       labels=["site", "cache"])
        for site in self._sites:
            for label in _LABELS:
                running, buckets = 0, []
                for i, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
                    running += totals[_bucket(site, label, i)]
                    buckets.append((str(bound) if bound != float("inf") else "+Inf", running))
                family.add_metric([site, label], buckets, totals[_sum_us(site, label)] / 1e6)
        return family

    def event_lag(self) -> HistogramMetricFamily:
        totals = self._tally.totals()
        family = HistogramMetricFamily("cachingproxy_event_lag_seconds",
                                       "From an S3 event's time to the moment the proxy applied it.")
        running, buckets = 0, []
        for i, bound in enumerate((*EVENT_LAG_BUCKETS, float("inf"))):
            running += totals[_lag_bucket(i)]
            buckets.append((str(bound) if bound != float("inf") else "+Inf", running))
        family.add_metric([], buckets, totals[_LAG_SUM] / 1e3)
        return family

    def render(self, snapshot: Snapshot) -> bytes:
        self.current = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self.current = None

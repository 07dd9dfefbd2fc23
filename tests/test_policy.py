"""Freshness policy tables: time is an argument, so no clock is needed here."""

from __future__ import annotations

import pytest

from cachingproxy.config import CacheRule
from cachingproxy.models import Entry, ObjectMeta
from cachingproxy.policy import (
    Action,
    Breaker,
    Confirm,
    Fail,
    Fetch,
    Health,
    Revalidate,
    Serve,
    ServeAndRefresh,
    ServeStale,
    Windows,
    decide,
    may_serve_stale,
    ttl_for,
)

T0 = 1_000_000.0


def make_entry(checked_at: float = T0, cache_control: str = "") -> Entry:
    headers = (("Cache-Control", cache_control),) if cache_control else ()
    return Entry(key="k", meta=ObjectMeta(etag='"e"', size=1, last_modified=T0, headers=headers),
                 checked_at=checked_at)


W = Windows(ttl=60, stale_while_revalidate=0, stale_if_error=86400)
SWR = Windows(ttl=60, stale_while_revalidate=30, stale_if_error=86400)
NO_SIE = Windows(ttl=60, stale_while_revalidate=0, stale_if_error=0)
UP, SHUNNED, FAILED, TIMED_OUT = Health.UP, Health.SHUNNED, Health.FAILED, Health.TIMED_OUT
STRICT = make_entry(cache_control="max-age=60, must-revalidate")


@pytest.mark.parametrize(("entry", "now", "windows", "health", "action"), [
    # Nothing cached: S3 is asked whatever the breaker says; only a failure already seen ends the request.
    pytest.param(None, T0, W, UP, Fetch(), id="nothing-cached-fetches"),
    pytest.param(None, T0, W, SHUNNED, Fetch(), id="nothing-cached-fetches-even-when-shunned"),
    pytest.param(None, T0, W, FAILED, Fail(502), id="nothing-cached-after-failure-502"),
    pytest.param(None, T0, W, TIMED_OUT, Fail(504), id="nothing-cached-after-timeout-504"),
    # Fresh (RFC 9111 §4.2): served, whatever the breaker says.
    pytest.param(make_entry(), T0, W, UP, Serve(), id="just-checked-serves"),
    pytest.param(make_entry(), T0 + 59.9, W, UP, Serve(), id="within-ttl-serves"),
    pytest.param(make_entry(), T0 + 30, W, SHUNNED, Serve(), id="fresh-serves-when-shunned"),
    # Stale.
    pytest.param(make_entry(), T0 + 60, W, UP, Revalidate(), id="at-ttl-revalidates"),
    pytest.param(make_entry(), T0 + 3600, W, UP, Revalidate(), id="long-stale-revalidates"),
    pytest.param(make_entry(), T0 - 5, W, UP, Revalidate(), id="clock-went-backwards-revalidates"),
    pytest.param(make_entry(), T0 + 89, SWR, UP, ServeAndRefresh(), id="5861-3-within-swr-serves-and-refreshes"),
    pytest.param(make_entry(), T0 + 90, SWR, UP, Revalidate(), id="5861-3-past-swr-revalidates"),
    # S3 shunned by the breaker: a copy that may be served stale is served at once, nobody waits.
    pytest.param(make_entry(), T0 + 61, W, SHUNNED, ServeStale(), id="shunned-serves-stale-at-once"),
    pytest.param(make_entry(), T0 + 61, NO_SIE, SHUNNED, Revalidate(), id="shunned-no-stale-window-asks"),
    pytest.param(STRICT, T0 + 61, W, SHUNNED, Revalidate(), id="shunned-must-revalidate-asks"),
    # The call made for this request failed (RFC 5861 §4 stale-if-error).
    pytest.param(make_entry(), T0 + 61, W, FAILED, ServeStale(), id="5861-4-failed-serves-stale"),
    pytest.param(make_entry(), T0 + 61, W, TIMED_OUT, ServeStale(), id="5861-4-timeout-serves-stale"),
    pytest.param(make_entry(), T0 + 30, W, FAILED, ServeStale(), id="failed-refetch-of-fresh-entry-serves-it"),
    pytest.param(make_entry(), T0 + 61 + 86400, W, FAILED, Fail(502), id="past-stale-window-502"),
    pytest.param(make_entry(), T0 + 61, NO_SIE, TIMED_OUT, Fail(504), id="no-stale-window-504"),
    pytest.param(STRICT, T0 + 61, W, FAILED, Fail(502), id="9111-4.2.4-must-revalidate-502"),
])
def test_decide(entry: Entry | None, now: float, windows: Windows, health: Health, action: Action) -> None:
    assert decide(entry, now, windows, health) == action


@pytest.mark.parametrize(("entry", "listed", "action"), [
    pytest.param(make_entry(), '"e"', Confirm(), id="listing-same-etag-confirms"),
    pytest.param(make_entry(T0 - 86400 * 30), '"e"', Confirm(), id="listing-confirms-however-stale"),
    pytest.param(make_entry(), '"other"', Fetch(), id="listing-new-etag-fetches"),
    pytest.param(None, '"e"', Fetch(), id="listing-uncached-fetches"),
])
def test_decide_for_a_listing(entry: Entry | None, listed: str, action: Action) -> None:
    assert decide(entry, T0, W, listed_etag=listed) == action


def test_zero_ttl_always_revalidates() -> None:
    assert decide(make_entry(), T0, Windows(ttl=0)) == Revalidate()


def test_breaker_shuns_after_threshold_then_lets_one_probe_through() -> None:
    breaker = Breaker(threshold=2, cooldown=10)
    breaker.failure(T0)
    assert breaker.health(T0) is UP
    breaker.failure(T0)
    assert breaker.health(T0 + 9.9) is SHUNNED
    assert breaker.health(T0 + 10) is UP  # the cooldown is over: the next call is the probe
    breaker.sending(T0 + 10)
    assert breaker.health(T0 + 10.1) is SHUNNED  # while the probe runs, the rest keep serving stale
    breaker.success()
    assert breaker.health(T0 + 10.2) is UP  # one success closes it at once


@pytest.mark.parametrize(("key", "ttl"), [
    pytest.param("_static/site.css", 3600, id="double-star-crosses-slash"),
    pytest.param("_static/img/a.png", 3600, id="double-star-deep"),
    pytest.param("index.html", 5, id="star-matches-top-level"),
    pytest.param("guides/index.html", 60, id="star-does-not-cross-slash"),
    pytest.param("guides/a.htm", 60, id="no-match-default"),
    pytest.param("a?.txt", 7, id="question-mark-single-char"),
])
def test_ttl_rules_first_match_wins(key: str, ttl: float) -> None:
    rules = (CacheRule("_static/**", 3600), CacheRule("*.html", 5), CacheRule("a??txt", 7),
             CacheRule("**", 1))
    assert ttl_for(key, rules[:3], 60) == ttl


@pytest.mark.parametrize(("age", "cache_control", "allowed"), [
    pytest.param(61, "", True, id="5861-4-just-stale"),
    pytest.param(60 + 86400, "", True, id="5861-4-end-of-window"),
    pytest.param(60 + 86401, "", False, id="5861-4-past-window"),
    pytest.param(61, "max-age=60, must-revalidate", False, id="9111-4.2.4-must-revalidate"),
    pytest.param(61, "no-cache", False, id="9111-4.2.4-no-cache"),
    pytest.param(61, "public, max-age=60", True, id="plain-max-age-allows"),
])
def test_stale_if_error_window(age: float, cache_control: str, allowed: bool) -> None:
    assert may_serve_stale(make_entry(cache_control=cache_control), 60, 86400, T0 + age) is allowed

"""Freshness policy tables: time is an argument, so no clock is needed here."""

from __future__ import annotations

import pytest

from cachingproxy.config import CacheRule
from cachingproxy.models import Entry, ObjectMeta
from cachingproxy.policy import Action, decide, may_serve_stale, ttl_for

T0 = 1_000_000.0


def make_entry(checked_at: float = T0, cache_control: str = "") -> Entry:
    headers = (("Cache-Control", cache_control),) if cache_control else ()
    return Entry(key="k", meta=ObjectMeta(etag='"e"', size=1, last_modified=T0, headers=headers),
                 checked_at=checked_at)


@pytest.mark.parametrize(("entry", "now", "action"), [
    pytest.param(None, T0, Action.FETCH, id="nothing-cached-fetches"),
    pytest.param(make_entry(), T0, Action.SERVE, id="just-checked-serves"),
    pytest.param(make_entry(), T0 + 59.9, Action.SERVE, id="within-ttl-serves"),
    pytest.param(make_entry(), T0 + 60, Action.REVALIDATE, id="at-ttl-revalidates"),
    pytest.param(make_entry(), T0 + 3600, Action.REVALIDATE, id="long-stale-revalidates"),
    pytest.param(make_entry(), T0 - 5, Action.REVALIDATE, id="clock-went-backwards-revalidates"),
])
def test_decide(entry: Entry | None, now: float, action: Action) -> None:
    assert decide(entry, 60, now) is action


def test_zero_ttl_always_revalidates() -> None:
    assert decide(make_entry(), 0, T0) is Action.REVALIDATE


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

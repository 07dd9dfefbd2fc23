"""Per-worker memos of the hit path admit what is asked for twice (admission.py): a stream of one-off keys
(cold fills, 404 scans, crawlers) leaves them as they were, so their memory stops growing once the hot set is
in; memos of per-second headers keep one second's (benchmarks/results/footprint.md, "Third round: growth")."""

from __future__ import annotations

import uuid

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from cachingproxy import accessline, compressed, hitpath
from cachingproxy.admission import SecondSight
from cachingproxy.config import CompressionConfig
from cachingproxy.freshness import ClientFreshness
from cachingproxy.models import ObjectMeta, Outcome

ONE_OFF = 3000  # distinct keys, each asked for once: more than any of the memos holds


def test_a_key_is_admitted_on_its_second_sight() -> None:
    seen = SecondSight(16)
    assert [seen.again("a"), seen.again("a"), seen.again("a")] == [False, True, True]
    taker = next(k for k in map(str, range(10_000)) if hash(k) & 15 == hash("a") & 15 and k != "a")
    assert not seen.again(taker)  # took a's slot: a starts over
    assert not seen.again("a")
    assert seen.nbytes == 16 * 8
    assert not seen.seen("b") and not seen.seen("b")  # looking takes no note
    assert seen.seen("a")


def test_the_table_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError):
        SecondSight(1000)


def test_paths_asked_for_once_are_not_remembered() -> None:
    hitpath._memo_request_key.cache_clear()
    run = uuid.uuid4().hex  # the table of paths seen is the process's: paths no other test asked for
    for i in range(ONE_OFF):
        hitpath.memo_request_key(f"/docs/{run}/{i:x}.html", "/docs", "", "index.html")
    assert hitpath._memo_request_key.cache_info().currsize == 0
    for _ in range(3):
        key = hitpath.memo_request_key(f"/docs/{run}/guide/", "/docs", "", "index.html")
    assert hitpath._memo_request_key.cache_info().currsize == 1
    assert key == hitpath.memo_request_key(f"/docs/{run}/guide/", "/docs", "", "index.html")


def test_only_hits_fill_the_access_line_memo() -> None:
    accessline._stem.cache_clear()

    def stem(path: str, cache: str) -> tuple[str, str]:
        return accessline.json_stem(site="docs", client="10.0.0.1", method="GET", path=path, status=200,
                                    size=10, cache=cache, s3={}, user_agent="crawler")

    for i in range(ONE_OFF):
        stem(f"/docs/cold/{i}.html", "MISS")
    assert accessline._stem.cache_info().currsize == 0
    first = stem("/docs/hot.css", "HIT")
    assert stem("/docs/hot.css", "HIT") is first
    assert accessline._stem.cache_info().currsize == 1
    assert stem("/docs/cold/1.html", "MISS") == accessline._stem.__wrapped__(
        "docs", "10.0.0.1", "GET", "/docs/cold/1.html", 200, 10, "MISS", "{}", "crawler")


def test_versions_negotiated_once_are_not_remembered() -> None:
    compressed._memo_choose.cache_clear()
    config = CompressionConfig()
    headers = {"Accept-Encoding": "gzip, br"}

    def meta(etag: str) -> ObjectMeta:  # a new object each time, as each lookup decodes one
        return ObjectMeta(etag=etag, size=5000, last_modified=None, headers=(("Content-Type", "text/css"),))

    for i in range(ONE_OFF):
        compressed.negotiate_for(config, headers, meta(f'"{i:032x}"'))
    assert compressed._memo_choose.cache_info().currsize == 0
    choices = [compressed.negotiate_for(config, headers, meta('"hot"')) for _ in range(3)]
    assert compressed._memo_choose.cache_info().currsize == 1
    assert choices[0] == choices[1] == choices[2]
    assert choices[0] is not None and choices[0].coding == "br"


def test_coded_headers_are_kept_for_their_second_only() -> None:
    """Their keys are memo_headers' results, new every second: an earlier second's are never asked for again."""
    def head(age: int) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict({"ETag": '"abc"', "Age": str(age)}))

    heads = [head(age) for age in range(50)]  # kept alive: ids stay distinct
    for h in heads:
        assert compressed.coded_headers(h, "br", 7_777_777.5)["ETag"] == '"abc-br"'
    assert len(compressed._HEADERS) == 50
    later = head(0)
    assert compressed.coded_headers(later, "br", 7_777_778.0) is compressed.coded_headers(later, "br", 7_777_778.9)
    assert len(compressed._HEADERS) == 1


def test_response_heads_are_kept_for_their_second_only() -> None:
    """memo_headers' keys hold Age and TTL left, so an earlier second's heads are never asked for again; kept,
    they stayed in every worker at the memo's 1024 for good."""
    client = ClientFreshness("max-age=60")
    metas = [ObjectMeta(etag=f'"{i}"', size=i, last_modified=None) for i in range(50)]
    for meta in metas:
        hitpath.memo_headers(meta, Outcome.HIT, 3, 57, 7_777_774, client, 7_777_777.5)
    assert hitpath._memo_headers.cache_info().currsize == 50
    head = hitpath.memo_headers(metas[0], Outcome.HIT, 4, 56, 7_777_774, client, 7_777_778.0)
    assert head["Age"] == "4"
    assert head is hitpath.memo_headers(metas[0], Outcome.HIT, 4, 56, 7_777_774, client, 7_777_778.9)
    assert hitpath._memo_headers.cache_info().currsize == 1


async def test_variant_sets_of_versions_nobody_asked_for_turn_over_in_a_small_segment() -> None:
    """A fill's variants are made at once, but only a version asked for afterwards joins the 1024 remembered
    ones: 3000 one-off fills (a crawler) leave at most 128 variant sets in a worker, where they filled the
    1024 for minutes; a version asked for stays, and is found."""
    from concurrent.futures import ThreadPoolExecutor

    from cachingproxy import variants
    from cachingproxy.variants import Variants

    maker = Variants(None, CompressionConfig(enabled=False), ThreadPoolExecutor(1))  # type: ignore[arg-type]
    maker._remember(("hot.css", '"1"'), frozenset({"br", "gzip"}))
    assert maker.present("hot.css", '"1"') == {"br", "gzip"}  # asked for: kept
    for i in range(ONE_OFF):
        maker._remember((f"once-{i}.css", '"1"'), frozenset({"br"}))
    assert len(maker._known) == 1 and len(maker._unasked) == variants._UNASKED
    assert maker.present("hot.css", '"1"') == {"br", "gzip"}
    assert maker.present(f"once-{ONE_OFF - 1}.css", '"1"') == {"br"}  # a recent one, asked for now: promoted
    assert len(maker._known) == 2 and maker.present("once-0.css", '"1"') is None

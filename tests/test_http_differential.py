"""Differential HTTP test: the same request to moto's S3 directly and to the proxy, compared field by field.

For every object in CORPUS and every request in CASES, the proxy is asked three times: on a cold miss, on a
fresh hit and after a revalidation (`clock.advance(61)`, one HeadObject). Each answer must equal what S3 (moto,
signed with botocore's presigned URLs) says for the same request: status, body, Content-Length, Content-Range,
ETag, Last-Modified and Content-Type. HEAD must also equal the proxy's own GET without the body.

Where the proxy deliberately answers differently, the row in DIFFERENCES says so and why; the test then checks
the proxy against S3's answer to the request the proxy treats it as (`like`), and checks that the difference is
still real, so a stale row fails instead of silently hiding a regression. This table is the source of the
README's "Deliberate differences from S3".
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from .conftest import Bucket, FakeClock, MakeProxy, service_of, store_of
from .shim import Shim

PREFIX = "site/"
COMPARED = ("Content-Length", "Content-Range", "ETag", "Last-Modified", "Content-Type")
BIG = 20 * 1024 * 1024


@dataclass(frozen=True)
class Obj:
    key: str  # below PREFIX
    body: bytes
    put: dict[str, Any] = field(default_factory=dict)
    cases: tuple[str, ...] | None = None  # None: every case


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    headers: dict[str, str]  # values are str.format templates, see `_fill`


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # only the names we look at, plus every x-amz-* name
    body: bytes


@dataclass(frozen=True)
class Difference:
    s3: str  # what S3 does (and whether that is documented S3 behaviour or moto's)
    proxy: str
    why: str
    cases: frozenset[str] = frozenset()  # requests the proxy answers like S3 answers `like`
    like: str = ""
    empty_only: bool = False  # the row applies to the empty object only


# -- the requests ----------------------------------------------------------------------------------------

CASES = (
    Case("get", "GET", {}),
    Case("head", "HEAD", {}),
    # Range (RFC 9110 §14)
    Case("range-0-0", "GET", {"Range": "bytes=0-0"}),
    Case("range-10-", "GET", {"Range": "bytes=10-"}),
    Case("range-suffix-10", "GET", {"Range": "bytes=-10"}),
    Case("range-past-end", "GET", {"Range": "bytes={size}-"}),
    Case("range-past-end-closed", "GET", {"Range": "bytes={size_plus_5}-{size_plus_10}"}),
    Case("range-clamped", "GET", {"Range": "bytes=0-{size_plus_10}"}),
    Case("range-zero-suffix", "GET", {"Range": "bytes=-0"}),
    Case("range-malformed", "GET", {"Range": "bytes=abc"}),
    Case("range-reversed", "GET", {"Range": "bytes=5-2"}),
    Case("range-bare-dash", "GET", {"Range": "bytes=-"}),
    Case("range-multi", "GET", {"Range": "bytes=0-1,5-6"}),
    Case("range-1000", "GET", {"Range": "bytes=" + ",".join(["0-0"] * 1000)}),  # Range DoS (RFC 9110 §17.15)
    Case("range-suffix-1", "GET", {"Range": "bytes=-1"}),
    Case("range-other-unit", "GET", {"Range": "items=0-1"}),
    Case("head-range", "HEAD", {"Range": "bytes=0-0"}),
    # If-None-Match (§13.1.2)
    Case("inm-exact", "GET", {"If-None-Match": "{etag}"}),
    Case("inm-weak", "GET", {"If-None-Match": "W/{etag}"}),
    Case("inm-list", "GET", {"If-None-Match": '"nope", {etag}'}),
    Case("inm-star", "GET", {"If-None-Match": "*"}),
    Case("inm-other", "GET", {"If-None-Match": '"nope"'}),
    Case("head-inm", "HEAD", {"If-None-Match": "{etag}"}),
    # If-Modified-Since (§13.1.3)
    Case("ims-before", "GET", {"If-Modified-Since": "{before}"}),
    Case("ims-equal", "GET", {"If-Modified-Since": "{lm}"}),
    Case("ims-after", "GET", {"If-Modified-Since": "{after}"}),
    Case("ims-invalid", "GET", {"If-Modified-Since": "not a date"}),
    Case("inm-false-ims-true", "GET", {"If-None-Match": '"nope"', "If-Modified-Since": "{after}"}),
    Case("inm-true-ims-false", "GET", {"If-None-Match": "{etag}", "If-Modified-Since": "{before}"}),
    # If-Match and If-Unmodified-Since (§13.1.1, §13.1.4)
    Case("im-exact", "GET", {"If-Match": "{etag}"}),
    Case("im-other", "GET", {"If-Match": '"nope"'}),
    Case("im-weak", "GET", {"If-Match": "W/{etag}"}),
    Case("im-list", "GET", {"If-Match": '"nope", {etag}'}),
    Case("im-star", "GET", {"If-Match": "*"}),
    Case("head-im-other", "HEAD", {"If-Match": '"nope"'}),
    Case("ius-before", "GET", {"If-Unmodified-Since": "{before}"}),
    Case("ius-after", "GET", {"If-Unmodified-Since": "{after}"}),
    Case("ius-invalid", "GET", {"If-Unmodified-Since": "not a date"}),
    Case("im-true-ius-false", "GET", {"If-Match": "{etag}", "If-Unmodified-Since": "{before}"}),
    Case("im-false-inm-true", "GET", {"If-Match": '"nope"', "If-None-Match": "{etag}"}),
    # If-Range (§13.1.5)
    Case("ir-etag-match", "GET", {"If-Range": "{etag}", "Range": "bytes=0-0"}),
    Case("ir-etag-mismatch", "GET", {"If-Range": '"nope"', "Range": "bytes=0-0"}),
    Case("ir-weak-etag", "GET", {"If-Range": "W/{etag}", "Range": "bytes=0-0"}),
    Case("ir-date-match", "GET", {"If-Range": "{lm}", "Range": "bytes=0-0"}),
    Case("ir-date-mismatch", "GET", {"If-Range": "{before}", "Range": "bytes=0-0"}),
    Case("inm-with-range", "GET", {"If-None-Match": "{etag}", "Range": "bytes=0-0"}),
)
CASE = {case.id: case for case in CASES}
# Every plain ranged GET: what the empty object answers with 200 (a matching If-None-Match still wins).
_RANGED = frozenset(c.id for c in CASES
                    if c.method == "GET" and "Range" in c.headers and "If-None-Match" not in c.headers)


# -- the one table of deliberate differences -------------------------------------------------------------
# Rows with `cases` change the status or body (the first row that applies wins); the others are about the
# headers of a kind of response.
DIFFERENCES: dict[str, Difference] = {
    "empty-object-ignores-range": Difference(
        s3="416 InvalidRange for `bytes=0-0` or `bytes=10-` on an empty object",
        proxy="200 with the empty body",
        why="RFC 9110 §14.1.1/§14.2: no int-range is satisfiable for 0 bytes and a server MAY ignore Range; "
            "a 416 would break every client that always asks for a range",
        cases=_RANGED,
        like="get", empty_only=True),
    "ims-ignored-when-inm-present": Difference(
        s3="304 when If-None-Match is false but If-Modified-Since is true (documented S3 behaviour; moto too)",
        proxy="200: If-Modified-Since is ignored whenever If-None-Match is present",
        why="RFC 9110 §13.1.3 and the §13.2.2 order: a changed ETag must not be hidden by a date",
        cases=frozenset({"inm-false-ims-true"}), like="get"),
    "inm-weak-comparison": Difference(
        s3="moto compares If-None-Match as a raw string, so W/\"etag\" gives 200",
        proxy="304: weak comparison",
        why="RFC 9110 §13.1.2 requires the weak comparison for If-None-Match",
        cases=frozenset({"inm-weak"}), like="inm-exact"),
    "inm-list-and-star": Difference(
        s3="moto does not parse lists or `*` in If-None-Match (200)",
        proxy="304 when any listed tag matches, or for `*`",
        why="RFC 9110 §13.1.2: a list of entity-tags, and `*` matches any current representation",
        cases=frozenset({"inm-list", "inm-star"}), like="inm-exact"),
    "if-match-list-and-star": Difference(
        s3="moto answers 412 to a list containing the ETag and to `*`",
        proxy="200",
        why="RFC 9110 §13.1.1: true if any listed tag strongly matches, and `*` matches any representation",
        cases=frozenset({"im-list", "im-star"}), like="get"),
    "ius-ignored-when-if-match-present": Difference(
        s3="moto: 412; real S3 documents 200 (If-Match true wins over If-Unmodified-Since false)",
        proxy="200, as real S3",
        why="RFC 9110 §13.1.4: If-Unmodified-Since is ignored when If-Match is present",
        cases=frozenset({"im-true-ius-false"}), like="get"),
    "invalid-dates-ignored": Difference(
        s3="moto answers 500 to an unparseable If-Modified-Since/If-Unmodified-Since",
        proxy="the header is ignored (200)",
        why="RFC 9110 §13.1.3/§13.1.4: an invalid HTTP-date is ignored",
        cases=frozenset({"ims-invalid", "ius-invalid"}), like="get"),
    "if-range-honoured": Difference(
        s3="moto ignores If-Range (206 even when the validator does not match); GetObject does not document it",
        proxy="200 with the whole object when If-Range does not match (strong ETag or exact date)",
        why="RFC 9110 §13.1.5: a stale If-Range must get the full representation, never a splice of two versions",
        cases=frozenset({"ir-etag-mismatch", "ir-weak-etag", "ir-date-mismatch"}), like="get"),
    "unknown-range-unit-ignored": Difference(
        s3="moto treats any unit as bytes (`items=0-1` gives 206)",
        proxy="200 with the whole object",
        why="RFC 9110 §14.2: a Range with an unknown unit is ignored",
        cases=frozenset({"range-other-unit"}), like="get"),
    "reversed-range-ignored": Difference(
        s3="moto compares first-pos with the length before checking the range is valid: `bytes=5-2` is 416 "
           "on an object shorter than 6 bytes (200 on longer ones)",
        proxy="200 with the whole object, whatever the length",
        why="RFC 9110 §14.1.1: last-pos < first-pos makes the range invalid, and §14.2 ignores invalid ranges",
        cases=frozenset({"range-reversed"}), like="get"),
    "head-ignores-range": Difference(
        s3="HeadObject honours Range (206 with Content-Range and the range's Content-Length)",
        proxy="HEAD answers exactly like the GET without Range would, minus the body",
        why="RFC 9110 §14.2: range handling is defined for GET only; HEAD mirrors a plain GET",
        cases=frozenset({"head-range"}), like="head"),
    "416-content-range": Difference(
        s3="416 without Content-Range (moto)",
        proxy="416 with `Content-Range: bytes */<size>`",
        why="RFC 9110 §15.5.17: a 416 SHOULD say the current length"),
    "304-headers": Difference(
        s3="304 with ETag only (moto)",
        proxy="304 also carries Last-Modified and Cache-Control/Expires when the object has them, "
              "plus X-Cache, Age and Cache-Status",
        why="RFC 9110 §15.4.5: a 304 carries the validators and caching headers a 200 would"),
    "error-bodies": Difference(
        s3="412/416 bodies are S3 error XML naming the key, bucket and request id",
        proxy="a short text/plain line",
        why="the issue's leak rules: error responses never carry S3 error XML, bucket names or keys"),
    "no-amz-headers": Difference(
        s3="x-amz-meta-* user metadata and x-amz-request-id/x-amz-id-2 on every answer",
        proxy="no x-amz-* headers; only the representation headers in origin.FORWARDED_HEADERS",
        why="metadata is publisher-controlled and may carry anything; nothing is reflected unless whitelisted"),
}

# -- the corpus -------------------------------------------------------------------------

SMALL_CASES = ("get", "head", "range-0-0", "range-10-", "range-suffix-10", "inm-exact", "ims-after", "head-inm")
BIG_CASES = ("get", "head", "range-0-0", "range-10-", "range-suffix-10", "range-past-end", "inm-exact",
             "ir-etag-mismatch")
_rng = random.Random(5)
CORPUS = (
    Obj("empty.txt", b""),
    Obj("one.bin", b"\x07"),
    Obj("page.html", b"<!doctype html><title>t</title><p>hello</p>\n" * 40,
        {"ContentType": "text/html; charset=utf-8", "CacheControl": "max-age=30", "Metadata": {"owner": "x"},
         "Expires": datetime(2030, 1, 1, tzinfo=UTC)}),
    Obj("data.bin", _rng.randbytes(10_000)),
    Obj("big.bin", _rng.randbytes(BIG), cases=BIG_CASES),
    Obj("with space.txt", b"space", cases=SMALL_CASES),
    Obj("plus+sign.txt", b"plus", cases=SMALL_CASES),
    Obj("per%cent.txt", b"percent", cases=SMALL_CASES),
    Obj("ünïcødé/文件.txt", "unicode ✓".encode(), cases=SMALL_CASES),
    Obj("eq=sign.txt", b"equals", cases=SMALL_CASES),
    Obj("amp&ersand.txt", b"ampersand", cases=SMALL_CASES),
    Obj("semi;colon.txt", b"semicolon", cases=SMALL_CASES),
)

STATES = ("MISS", "HIT", "REVALIDATED")


def _difference(obj: Obj, case_id: str) -> tuple[str, Difference] | None:
    for name, row in DIFFERENCES.items():
        if case_id in row.cases and (not row.empty_only or not obj.body):
            return name, row
    return None


def _fill(case: Case, etag: str, last_modified: str, size: int) -> dict[str, str]:
    lm = parsedate_to_datetime(last_modified).timestamp()
    values = {"etag": etag, "lm": last_modified, "size": size, "size_plus_5": size + 5, "size_plus_10": size + 10,
              "before": formatdate(lm - 3600, usegmt=True), "after": formatdate(lm + 3600, usegmt=True)}
    return {name: value.format(**values) for name, value in case.headers.items()}


async def _answer(resp: aiohttp.ClientResponse) -> Answer:
    body = await resp.read()
    names = [*COMPARED, "X-Cache", "Cache-Control", "Expires"] + [
        h for h in resp.headers if h.lower().startswith("x-amz")]
    return Answer(resp.status, {n: resp.headers[n] for n in names if n in resp.headers}, body)


class Recorder:
    """Counts the comparisons and which table rows were seen to be real differences."""

    def __init__(self) -> None:
        self.compared = 0
        self.seen: set[str] = set()


def _compare(where: str, obj: Obj, case: Case, got: Answer, s3: dict[str, Answer], rec: Recorder) -> None:
    """One proxy answer against S3's answers (`s3` maps case id -> moto's answer for this object)."""
    rec.compared += 1
    expected = s3[case.id]
    diff = _difference(obj, case.id)
    if diff is not None:
        name, row = diff
        reference = s3[row.like]
        if (reference.status, reference.body) != (expected.status, expected.body):
            rec.seen.add(name)
        expected = reference
    assert got.status == expected.status, f"{where}: status {got.status}, S3 says {expected.status}"
    if got.status in (412, 416):
        assert len(got.body) < 40 and b"<" not in got.body, where
        if expected.body.startswith(b"<?xml"):
            rec.seen.add("error-bodies")
        if got.status == 416:
            assert got.headers.get("Content-Range") == f"bytes */{len(obj.body)}", where
            if "Content-Range" not in expected.headers:
                rec.seen.add("416-content-range")
        return
    if any(h.lower().startswith("x-amz-meta-") for h in expected.headers):
        rec.seen.add("no-amz-headers")
    assert not any(h.lower().startswith("x-amz") for h in got.headers), where
    assert got.body == expected.body, f"{where}: body differs ({len(got.body)} vs {len(expected.body)} bytes)"
    if got.status == 304:
        assert got.headers["ETag"] == expected.headers["ETag"], where
        assert got.headers.get("Last-Modified") == s3["get"].headers["Last-Modified"], where
        # RFC 9110 §15.4.5: as the proxy's 200 would have said: S3's Cache-Control/Expires, or the default
        # client_cache_control when S3 set neither (issue 18, freshness.py).
        said = {name: s3["get"].headers.get(name) for name in ("Cache-Control", "Expires")}
        if said == {"Cache-Control": None, "Expires": None}:
            said["Cache-Control"] = "no-cache"
        for name, value in said.items():
            assert got.headers.get(name) == value, f"{where}: {name}"
        if "Last-Modified" not in expected.headers:
            rec.seen.add("304-headers")
        return
    for name in COMPARED:
        assert got.headers.get(name) == expected.headers.get(name), f"{where}: {name}"


async def _moto_answers(session: aiohttp.ClientSession, s3_client: Any, bucket: Bucket, obj: Obj,
                        cases: tuple[Case, ...]) -> tuple[dict[str, Answer], dict[str, dict[str, str]]]:
    params = {"Bucket": bucket.name, "Key": PREFIX + obj.key}
    urls = {m: s3_client.generate_presigned_url(op, Params=params)
            for m, op in (("GET", "get_object"), ("HEAD", "head_object"))}
    async with session.get(urls["GET"]) as plain:
        etag, last_modified = plain.headers["ETag"], plain.headers["Last-Modified"]
    answers, requests = {}, {}
    for case in cases:
        requests[case.id] = _fill(case, etag, last_modified, len(obj.body))
        async with session.request(case.method, urls[case.method], headers=requests[case.id]) as resp:
            answers[case.id] = await _answer(resp)
    return answers, requests


def _cases_for(obj: Obj) -> tuple[Case, ...]:
    ids = obj.cases or tuple(CASE)
    needed = set(ids) | {"get", "head"} | {d[1].like for i in ids if (d := _difference(obj, i)) is not None}
    return tuple(CASE[i] for i in CASE if i in needed)


async def test_proxy_answers_like_s3(make_proxy: MakeProxy, bucket: Bucket, shim: Shim, clock: FakeClock,
                                     s3_client: Any) -> None:
    proxy = await make_proxy(s3={"prefix": PREFIX})
    store, service = store_of(proxy), service_of(proxy)
    rec = Recorder()
    for obj in CORPUS:
        bucket.put(PREFIX + obj.key, obj.body, **obj.put)
    plan = {obj.key: _cases_for(obj) for obj in CORPUS}

    async def ask(obj: Obj, case: Case, state: str, s3: dict[str, Answer], request: dict[str, str]) -> None:
        # Literal sub-delims in the path: "+", "=", "&" and ";" are not special to the proxy (docs/reliability.md §3).
        path = "/docs/" + quote(obj.key, safe="/+=&;")
        if state == "MISS":
            await store.forget(PREFIX + obj.key)
        elif await store.lookup(PREFIX + obj.key) is None:  # HEAD on a miss does not fill: warm it first
            warm = await proxy.get(path)
            assert warm.status == 200 and len(await warm.read()) == len(obj.body)
            await service.settle()
        # S3 never compresses: compare the identity representation (aiohttp would ask for gzip and deflate).
        # Compressed responses have their own rules, proven in tests/test_compression.py.
        resp = await proxy.request(case.method, path, headers={"Accept-Encoding": "identity", **request})
        got = await _answer(resp)
        where = f"{obj.key!r} {case.id} {state}"
        if got.status in (200, 206, 304):
            assert got.headers.get("X-Cache") == state, where
        _compare(where, obj, case, got, s3, rec)

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        moto = await asyncio.gather(*(_moto_answers(session, s3_client, bucket, obj, plan[obj.key])
                                      for obj in CORPUS))
    answers = {obj.key: answer for obj, answer in zip(CORPUS, moto, strict=True)}
    for obj in CORPUS:
        # HEAD equals GET without the body at S3, so comparing each with S3 also proves it for the proxy.
        get, head = answers[obj.key][0]["get"], answers[obj.key][0]["head"]
        assert head.body == b"" and {n: head.headers.get(n) for n in COMPARED} == {
            n: get.headers.get(n) for n in COMPARED}
    # Objects are independent keys and run concurrently; the clock is shared, so the states advance in
    # lockstep: every entry is cold, then fresh, then one TTL (60 s) plus a second old.
    for case in CASES:
        objects = [obj for obj in CORPUS if case in plan[obj.key]]
        for state in STATES:
            if state == "REVALIDATED":
                clock.advance(61)
            await asyncio.gather(*(ask(obj, case, state, answers[obj.key][0], answers[obj.key][1][case.id])
                                   for obj in objects))
            await service.settle()
    # Every key went to S3 under its exact name, and nothing outside the prefix was asked for.
    assert {key for _, key in shim.log} == {PREFIX + obj.key for obj in CORPUS}
    stale = set(DIFFERENCES) - rec.seen
    assert not stale, f"rows in DIFFERENCES that no longer differ: {sorted(stale)}"
    assert rec.compared == 3 * sum(len(cases) for cases in plan.values())


async def test_head_matches_get_in_every_cache_state(make_proxy: MakeProxy, bucket: Bucket,
                                                      clock: FakeClock) -> None:
    proxy = await make_proxy()
    bucket.put("p.html", b"<p>x</p>", ContentType="text/html", CacheControl="max-age=5", ContentLanguage="en")
    names = (*COMPARED, "Cache-Control", "Content-Language", "Accept-Ranges", "X-Cache")

    async def pair() -> tuple[dict[str, str], dict[str, str]]:
        head = await proxy.head("/docs/p.html")
        assert await head.read() == b""
        get = await proxy.get("/docs/p.html")
        await get.read()
        await service_of(proxy).settle()
        return ({n: head.headers.get(n, "") for n in names}, {n: get.headers.get(n, "") for n in names})

    cold_head, first_get = await pair()  # HEAD on a cold key asks S3 with HeadObject
    assert cold_head == first_get
    hot_head, hot_get = await pair()
    assert hot_head == hot_get and hot_head["X-Cache"] == "HIT"
    clock.advance(61)
    head = await proxy.head("/docs/p.html")
    assert head.headers["X-Cache"] == "REVALIDATED"
    assert {n: head.headers.get(n, "") for n in names if n != "X-Cache"} == {
        n: v for n, v in hot_get.items() if n != "X-Cache"}


def test_every_difference_row_is_explained() -> None:
    for name, row in DIFFERENCES.items():
        assert row.s3 and row.proxy and row.why, name
        assert all(c in CASE for c in row.cases) and (not row.cases or row.like in CASE), name


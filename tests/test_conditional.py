"""Table tests for cachingproxy.conditional: one row per RFC 9110 §13/§14 rule."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from cachingproxy.conditional import Plan, evaluate

SIZE = 100
ETAG = '"0123456789abcdef0123456789abcdef"'
OTHER = '"ffffffffffffffffffffffffffffffff"'
LM = 1_700_000_000.0
AT = formatdate(LM, usegmt=True)
BEFORE = formatdate(LM - 60, usegmt=True)
AFTER = formatdate(LM + 60, usegmt=True)

FULL = Plan(200, 0, SIZE)
NOT_MODIFIED = Plan(304)
FAILED = Plan(412)
UNSATISFIABLE = Plan(416, content_range=f"bytes */{SIZE}")
FIRST_TEN = Plan(206, 0, 10, f"bytes 0-9/{SIZE}")


def partial(start: int, end: int) -> Plan:
    return Plan(206, start, end, f"bytes {start}-{end - 1}/{SIZE}")


def run(
    method: str,
    headers: dict[str, str],
    *,
    etag: str = ETAG,
    last_modified: float | None = LM,
    size: int = SIZE,
) -> Plan:
    return evaluate(method, headers, etag=etag, last_modified=last_modified, size=size)


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        pytest.param("GET", {}, FULL, id="13.2.1-no-conditions-full"),
        pytest.param("HEAD", {}, FULL, id="13.2.1-head-no-conditions-full"),
        # §13.1.2 If-None-Match: weak comparison
        pytest.param("GET", {"If-None-Match": ETAG}, NOT_MODIFIED, id="13.1.2-inm-exact-matches"),
        pytest.param("GET", {"If-None-Match": f"W/{ETAG}"}, NOT_MODIFIED, id="13.1.2-inm-weak-matches"),
        pytest.param(
            "GET", {"If-None-Match": f'"x", {OTHER}, {ETAG}'}, NOT_MODIFIED, id="13.1.2-inm-list-matches"
        ),
        pytest.param(
            "GET", {"If-None-Match": f'"a,b", W/{ETAG}'}, NOT_MODIFIED, id="13.1.2-inm-quoted-comma-list"
        ),
        pytest.param("GET", {"If-None-Match": "*"}, NOT_MODIFIED, id="13.1.2-inm-star-matches"),
        pytest.param("GET", {"If-None-Match": OTHER}, FULL, id="13.1.2-inm-non-matching"),
        pytest.param("GET", {"If-None-Match": f'"x", {OTHER}'}, FULL, id="13.1.2-inm-list-non-matching"),
        pytest.param("GET", {"If-None-Match": ETAG[1:-1]}, FULL, id="8.8.3-inm-unquoted-never-matches"),
        pytest.param("GET", {"If-None-Match": '"unterminated, ,,'}, FULL, id="8.8.3-inm-garbage-ignored"),
        pytest.param("HEAD", {"If-None-Match": ETAG}, NOT_MODIFIED, id="13.1.2-inm-head-304"),
        pytest.param("POST", {"If-None-Match": ETAG}, FAILED, id="13.1.2-inm-non-get-412"),
        pytest.param("DELETE", {"If-None-Match": "*"}, FAILED, id="13.1.2-inm-star-non-get-412"),
        pytest.param("POST", {"If-None-Match": OTHER}, FULL, id="13.1.2-inm-non-get-non-matching"),
        # §13.1.3 If-Modified-Since
        pytest.param("GET", {"If-Modified-Since": AT}, NOT_MODIFIED, id="13.1.3-ims-equal-304"),
        pytest.param("GET", {"If-Modified-Since": AFTER}, NOT_MODIFIED, id="13.1.3-ims-after-304"),
        pytest.param("GET", {"If-Modified-Since": BEFORE}, FULL, id="13.1.3-ims-before-200"),
        pytest.param("GET", {"If-Modified-Since": "yesterday"}, FULL, id="13.1.3-ims-invalid-ignored"),
        pytest.param(
            "GET", {"If-Modified-Since": f"{AT}, {AT}"}, FULL, id="13.1.3-ims-list-of-dates-ignored"
        ),
        pytest.param(
            "GET",
            {"If-Modified-Since": "Tuesday, 14-Nov-23 22:13:20 GMT"},
            NOT_MODIFIED,
            id="5.6.7-ims-rfc850-date",
        ),
        pytest.param(
            "GET",
            {"If-Modified-Since": "Tue Nov 14 22:13:20 2023"},
            NOT_MODIFIED,
            id="5.6.7-ims-asctime-date-is-utc",
        ),
        pytest.param("HEAD", {"If-Modified-Since": AT}, NOT_MODIFIED, id="13.1.3-ims-head-304"),
        pytest.param("POST", {"If-Modified-Since": AT}, FULL, id="13.1.3-ims-ignored-for-non-get"),
        # §13.2.2 step 3 before step 4: If-None-Match present means If-Modified-Since is ignored
        pytest.param(
            "GET",
            {"If-None-Match": OTHER, "If-Modified-Since": AFTER},
            FULL,
            id="13.1.3-inm-mismatch-overrides-ims",
        ),
        pytest.param(
            "GET",
            {"If-None-Match": ETAG, "If-Modified-Since": BEFORE},
            NOT_MODIFIED,
            id="13.1.2-inm-match-overrides-ims",
        ),
        # §13.1.1 If-Match: strong comparison
        pytest.param("GET", {"If-Match": ETAG}, FULL, id="13.1.1-im-true"),
        pytest.param("GET", {"If-Match": OTHER}, FAILED, id="13.1.1-im-false-412"),
        pytest.param("GET", {"If-Match": f"{OTHER}, {ETAG}"}, FULL, id="13.1.1-im-list-true"),
        pytest.param("GET", {"If-Match": "*"}, FULL, id="13.1.1-im-star-true"),
        pytest.param("GET", {"If-Match": f"W/{ETAG}"}, FAILED, id="8.8.3.2-im-weak-never-strong-matches"),
        pytest.param("GET", {"If-Match": "garbage"}, FAILED, id="8.8.3-im-garbage-412"),
        pytest.param(
            "GET", {"If-Match": OTHER, "Range": "bytes=0-9"}, FAILED, id="13.2.2-im-412-before-range"
        ),
        pytest.param("GET", {"If-Match": ETAG, "If-None-Match": ETAG}, NOT_MODIFIED, id="13.2.2-im-then-inm"),
        # §13.1.4 If-Unmodified-Since
        pytest.param("GET", {"If-Unmodified-Since": BEFORE}, FAILED, id="13.1.4-ius-modified-since-412"),
        pytest.param("GET", {"If-Unmodified-Since": AT}, FULL, id="13.1.4-ius-equal-true"),
        pytest.param("GET", {"If-Unmodified-Since": AFTER}, FULL, id="13.1.4-ius-after-true"),
        pytest.param("GET", {"If-Unmodified-Since": "not a date"}, FULL, id="13.1.4-ius-invalid-ignored"),
        pytest.param(
            "GET",
            {"If-Match": ETAG, "If-Unmodified-Since": BEFORE},
            FULL,
            id="13.2.2-ius-ignored-when-im-present",
        ),
        # §14.1.1/§14.2 Range (GET only)
        pytest.param("GET", {"Range": "bytes=0-0"}, partial(0, 1), id="14.1.1-range-first-byte"),
        pytest.param("GET", {"Range": "bytes=0-9"}, FIRST_TEN, id="14.1.1-range-int-range"),
        pytest.param("GET", {"Range": "bytes=10-"}, partial(10, SIZE), id="14.1.1-range-open-ended"),
        pytest.param("GET", {"Range": "bytes=-10"}, partial(90, SIZE), id="14.1.1-range-suffix"),
        pytest.param("GET", {"Range": "bytes=-1000"}, partial(0, SIZE), id="14.1.1-range-suffix-past-start"),
        pytest.param("GET", {"Range": "bytes=90-1000"}, partial(90, SIZE), id="14.1.1-range-last-clamped"),
        pytest.param("GET", {"Range": "bytes=99-99"}, partial(99, SIZE), id="14.1.1-range-last-byte"),
        pytest.param("GET", {"Range": "Bytes=0-9"}, FIRST_TEN, id="14.1-range-unit-case-insensitive"),
        pytest.param("GET", {"Range": "bytes=0-9,"}, FIRST_TEN, id="5.6.1-range-empty-element-ignored"),
        pytest.param("GET", {"Range": "bytes=100-"}, UNSATISFIABLE, id="14.1.1-range-open-past-end-416"),
        pytest.param("GET", {"Range": "bytes=100-200"}, UNSATISFIABLE, id="14.1.1-range-past-end-416"),
        pytest.param("GET", {"Range": "bytes=-0"}, UNSATISFIABLE, id="14.1.1-range-zero-suffix-416"),
        pytest.param("GET", {"Range": "bytes=5-2"}, FULL, id="14.1.1-range-last-before-first-ignored"),
        pytest.param("GET", {"Range": "bytes=0-1,5-6"}, FULL, id="14.2-range-multi-ignored"),
        pytest.param("GET", {"Range": "items=0-1"}, FULL, id="14.1-range-other-unit-ignored"),
        pytest.param("GET", {"Range": "bytes=abc"}, FULL, id="14.2-range-garbage-ignored"),
        pytest.param("GET", {"Range": "bytes=-"}, FULL, id="14.2-range-bare-dash-ignored"),
        pytest.param("GET", {"Range": "bytes="}, FULL, id="14.2-range-empty-set-ignored"),
        pytest.param("GET", {"Range": "bytes"}, FULL, id="14.2-range-no-equals-ignored"),
        pytest.param("GET", {"Range": "bytes=1 0-20"}, FULL, id="14.2-range-space-in-number-ignored"),
        pytest.param("GET", {"Range": "bytes=-5-10"}, FULL, id="14.2-range-negative-number-ignored"),
        pytest.param("GET", {"Range": "bytes=\u0661-\u0662"}, FULL, id="14.1.1-range-non-ascii-digits"),
        pytest.param("GET", {"Range": "bytes=0-" + "9" * 5000}, FULL, id="14.2-range-huge-number-ignored"),
        pytest.param("HEAD", {"Range": "bytes=0-9"}, FULL, id="14.2-head-ignores-range"),
        pytest.param("POST", {"Range": "bytes=0-9"}, FULL, id="14.2-non-get-ignores-range"),
        pytest.param(
            "GET", {"If-None-Match": ETAG, "Range": "bytes=0-9"}, NOT_MODIFIED, id="13.2.2-304-before-range"
        ),
        pytest.param(
            "GET",
            {"If-None-Match": OTHER, "Range": "bytes=0-9"},
            FIRST_TEN,
            id="13.2.2-inm-mismatch-then-range",
        ),
        # §13.1.5 If-Range
        pytest.param("GET", {"If-Range": ETAG, "Range": "bytes=0-9"}, FIRST_TEN, id="13.1.5-ir-etag-matches"),
        pytest.param("GET", {"If-Range": OTHER, "Range": "bytes=0-9"}, FULL, id="13.1.5-ir-etag-mismatch"),
        pytest.param(
            "GET", {"If-Range": f"W/{ETAG}", "Range": "bytes=0-9"}, FULL, id="13.1.5-ir-weak-etag-never"
        ),
        pytest.param("GET", {"If-Range": AT, "Range": "bytes=0-9"}, FIRST_TEN, id="13.1.5-ir-date-matches"),
        pytest.param("GET", {"If-Range": AFTER, "Range": "bytes=0-9"}, FULL, id="13.1.5-ir-later-date"),
        pytest.param("GET", {"If-Range": BEFORE, "Range": "bytes=0-9"}, FULL, id="13.1.5-ir-earlier-date"),
        pytest.param("GET", {"If-Range": "garbage", "Range": "bytes=0-9"}, FULL, id="13.1.5-ir-garbage"),
        pytest.param(
            "GET", {"If-Range": OTHER, "Range": "bytes=200-"}, FULL, id="13.1.5-ir-mismatch-skips-416"
        ),
        pytest.param("GET", {"If-Range": OTHER}, FULL, id="13.1.5-ir-without-range-ignored"),
    ],
)
def test_evaluate(method: str, headers: dict[str, str], expected: Plan) -> None:
    assert run(method, headers) == expected


@pytest.mark.parametrize(
    ("headers", "etag", "last_modified", "size", "expected"),
    [
        pytest.param(
            {"Range": "bytes=0-9"}, ETAG, LM, 0, Plan(200, 0, 0), id="14.2-empty-object-ignores-range"
        ),
        pytest.param({"Range": "bytes=-5"}, ETAG, LM, 0, Plan(200, 0, 0), id="14.2-empty-object-suffix"),
        pytest.param({}, ETAG, LM, 0, Plan(200, 0, 0), id="13.2.1-empty-object-full"),
        pytest.param({"If-Modified-Since": AFTER}, ETAG, None, SIZE, FULL, id="13.1.3-ims-no-last-modified"),
        pytest.param(
            {"If-Unmodified-Since": BEFORE}, ETAG, None, SIZE, FULL, id="13.1.4-ius-no-last-modified"
        ),
        pytest.param(
            {"If-Range": AT, "Range": "bytes=0-9"},
            ETAG,
            None,
            SIZE,
            FULL,
            id="13.1.5-ir-date-no-last-modified",
        ),
        pytest.param(
            {"If-Modified-Since": AT},
            ETAG,
            LM + 0.5,
            SIZE,
            NOT_MODIFIED,
            id="5.6.7-ims-whole-second-precision",
        ),
        pytest.param({"If-Match": 'W/"abc"'}, 'W/"abc"', LM, SIZE, FAILED, id="8.8.3.2-im-own-weak-etag"),
        pytest.param(
            {"If-None-Match": '"abc-3"'}, '"abc-3"', LM, SIZE, NOT_MODIFIED, id="8.8.3-multipart-etag"
        ),
    ],
)
def test_evaluate_object_variants(
    headers: dict[str, str], etag: str, last_modified: float | None, size: int, expected: Plan
) -> None:
    assert run("GET", headers, etag=etag, last_modified=last_modified, size=size) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"if-none-match": ETAG}, NOT_MODIFIED, id="5.1-field-names-case-insensitive-inm"),
        pytest.param(
            {"RANGE": "bytes=0-9", "if-range": ETAG}, FIRST_TEN, id="5.1-field-names-case-insensitive-range"
        ),
    ],
)
def test_case_insensitive_headers(headers: dict[str, str], expected: Plan) -> None:
    assert evaluate("GET", CIMultiDict(headers), etag=ETAG, last_modified=LM, size=SIZE) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param([("Range", "bytes=0-9")], FIRST_TEN, id="one-range-field"),
        pytest.param([("Range", "bytes=0-9"), ("Range", "bytes=50-59")], FULL, id="14.2-two-range-fields-ignored"),
        pytest.param([("Range", "bytes=0-9"), ("range", "bytes=0-9")], FULL, id="14.2-even-when-equal"),
    ],
)
def test_repeated_range_fields_are_ignored_not_guessed(fields: list[tuple[str, str]], expected: Plan) -> None:
    """Issue 17 item 6: Range is not a list, so two field lines are invalid; taking the first would be a guess."""
    assert evaluate("GET", CIMultiDict(fields), etag=ETAG, last_modified=LM, size=SIZE) == expected

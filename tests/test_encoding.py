"""Pure: Accept-Encoding negotiation (RFC 9110 §12.5.3) and the validators of variants, as tables."""

from __future__ import annotations

import pytest

from cachingproxy.config import COMPRESSIBLE_TYPES
from cachingproxy.encoding import Negotiated, choose, compressible, identity_inm, negotiate, no_transform, variant_etag

ALL = ("br", "zstd", "gzip")


@pytest.mark.parametrize(("header", "available", "expected"), [
    (None, ALL, None),  # no Accept-Encoding: identity, whatever §12.5.3 allows
    ("", ALL, None),
    ("gzip", ALL, "gzip"),
    ("x-gzip", ALL, "gzip"),  # §8.4.1.3: x-gzip is gzip
    ("gzip, deflate, br, zstd", ALL, "br"),  # ties: br, then zstd, then gzip
    ("gzip, zstd", ALL, "zstd"),
    ("GZIP, BR", ALL, "br"),  # codings are case-insensitive
    ("br;q=0.5, gzip", ALL, "gzip"),  # the highest q wins
    ("br;q=0.8, zstd;q=0.9, gzip;q=0.7", ALL, "zstd"),
    ("br;q=0, gzip", ALL, "gzip"),  # q=0: not acceptable
    ("br;q=0", ALL, None),
    ("*", ALL, "br"),  # any coding
    ("*;q=0.5, gzip", ALL, "gzip"),  # a named coding beats the wildcard's q
    ("*, br;q=0", ALL, "zstd"),  # the wildcard covers what is not named, and only that
    ("gzip;q=0.5, identity", ALL, None),  # identity rated strictly higher
    ("gzip;q=0.5", ALL, "gzip"),  # identity not named: a coding is still preferred
    ("gzip, identity;q=0", ALL, "gzip"),
    ("identity;q=0", ALL, None),  # nothing acceptable that we have: identity anyway (no 415 for a GET)
    ("br; q=1.0 , gzip ; q=0.9", ALL, "br"),  # whitespace around parameters
    ("br;q=2, gzip", ALL, "gzip"),  # an out-of-range q is read as 0
    ("br;q=abc, gzip", ALL, "gzip"),  # so is a garbled one
    ("deflate, compress", ALL, None),  # codings we never make
    ("gzip, br", ("gzip",), "gzip"),  # only what exists for this version is offered
    ("br", ("gzip", "zstd"), None),
])
def test_negotiation_table(header: str | None, available: tuple[str, ...], expected: str | None) -> None:
    assert negotiate(header, available) == expected


@pytest.mark.parametrize(("content_type", "expected"), [
    ("text/css", True), ("text/html; charset=utf-8", True), ("TEXT/PLAIN", True), ("application/javascript", True),
    ("application/json", True), ("image/svg+xml", True), ("application/wasm", True), ("font/ttf", True),
    ("font/woff2", False), ("image/png", False), ("application/zip", False), ("binary/octet-stream", False),
    ("", False),
])
def test_compressible_types(content_type: str, expected: bool) -> None:
    assert compressible(content_type, COMPRESSIBLE_TYPES) is expected


@pytest.mark.parametrize(("value", "expected"), [
    ("no-transform", True), ("public, No-Transform, max-age=60", True), ("max-age=60", False), ("", False),
    ("no-transformer", False),
])
def test_no_transform(value: str, expected: bool) -> None:
    assert no_transform(value) is expected


@pytest.mark.parametrize(("etag", "coding", "expected"), [
    ('"abc"', "br", '"abc-br"'), ('"abc-2"', "gzip", '"abc-2-gzip"'), ('W/"abc"', "zstd", 'W/"abc-zstd"'),
])
def test_variant_etag(etag: str, coding: str, expected: str) -> None:
    assert variant_etag(etag, coding) == expected


@pytest.mark.parametrize(("inm", "expected"), [
    ('"abc-br"', '"abc"'),  # RFC 9110 §13.1.2: a client holding the br bytes revalidates them
    ('"x", "abc-gzip"', '"x", "abc"'),
    ('W/"abc-zstd"', '"abc"'),  # weak comparison for If-None-Match
    ('"abc-identity"', '"abc"'),  # a gzip-stored object's decompressed bytes
    ('"abc"', '"abc"'), ("*", "*"), ('"other-br"', '"other-br"'),
])
def test_if_none_match_reads_a_variant_etag_as_the_objects(inm: str, expected: str) -> None:
    assert identity_inm({"If-None-Match": inm}, '"abc"')["If-None-Match"] == expected


CSS = (("Content-Type", "text/css"),)


@pytest.mark.parametrize(("request_headers", "stored", "size", "expected"), [
    ({"Accept-Encoding": "br"}, CSS, 5000, Negotiated("br", vary=True)),
    ({}, CSS, 5000, Negotiated(None, vary=True)),  # identity, but the response still varies
    ({"Accept-Encoding": "br"}, CSS, 1023, Negotiated(None, vary=True)),  # under min_size
    ({"Accept-Encoding": "br", "Range": "bytes=0-9"}, CSS, 5000, Negotiated(None, vary=True)),  # from identity
    ({"Accept-Encoding": "br"}, (("Content-Type", "image/png"),), 5000, None),  # never compressed: no Vary
    ({"Accept-Encoding": "br"}, (*CSS, ("Cache-Control", "no-transform")), 5000, None),  # RFC 9111 §5.2.2.6
    ({"Accept-Encoding": "gzip"}, (*CSS, ("Content-Encoding", "gzip")), 5000, Negotiated(None, vary=True)),
    ({"Accept-Encoding": "br"}, (*CSS, ("Content-Encoding", "gzip")), 5000,
     Negotiated(None, vary=True, gunzip=True)),  # stored gzip, client without gzip: decompressed
    ({}, (*CSS, ("Content-Encoding", "gzip")), 100, Negotiated(None, vary=True, gunzip=True)),
    ({"Accept-Encoding": "br"}, (*CSS, ("Content-Encoding", "identity")), 5000, Negotiated("br", vary=True)),
    ({"Accept-Encoding": "gzip"}, (*CSS, ("Content-Encoding", "compress")), 5000, None),  # left alone
])
def test_choose_table(request_headers: dict[str, str], stored: tuple[tuple[str, str], ...], size: int,
                      expected: Negotiated | None) -> None:
    assert choose(request_headers, stored, size, types=COMPRESSIBLE_TYPES, min_size=1024, enabled=True) == expected


def test_disabled_never_varies() -> None:
    assert choose({"Accept-Encoding": "br"}, CSS, 5000, types=COMPRESSIBLE_TYPES, min_size=0, enabled=False) is None

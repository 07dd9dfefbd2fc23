"""Pure: which content coding a response gets (RFC 9110 §12.5.3 Accept-Encoding), and the validators and
headers that go with it. Values in, values out; the variants themselves are made by variants.py.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["CODINGS", "Negotiated", "accepted", "choose", "compressible", "identity_inm", "negotiate",
           "no_transform", "variant_etag", "worth_compressing"]

# Preference on equal q-values: brotli is smallest for text, zstd next, gzip is the one everybody has.
CODINGS = ("br", "zstd", "gzip")
@dataclass(frozen=True, slots=True)
class Negotiated:
    """What one response for a compressible representation is: `coding` None means identity bytes."""

    coding: str | None
    vary: bool  # Vary: Accept-Encoding (every response of a compressible type, RFC 9110 §12.5.5)
    gunzip: bool = False  # a gzip-stored object sent to a client that does not take gzip: decompress it


@functools.lru_cache(maxsize=256)
def accepted(header: str | None) -> tuple[tuple[str, float], ...]:
    """Accept-Encoding parsed into (coding, q) pairs, lower-case; `x-gzip` is gzip (RFC 9110 §8.4.1.3).
    A malformed q reads as 0, so a garbled entry never makes us send what the client may not take."""
    if not header:
        return ()
    out: list[tuple[str, float]] = []
    for item in header.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        out.append(("gzip" if coding == "x-gzip" else coding, q))
    return tuple(out)


def _q(pairs: Iterable[tuple[str, float]], coding: str) -> float | None:
    """The q a client gave `coding`, or the `*` q when it is not named; None when neither appears."""
    star: float | None = None
    for name, q in pairs:
        if name == coding:
            return q
        if name == "*":
            star = q
    return star


@functools.lru_cache(maxsize=1024)
def negotiate(header: str | None, available: tuple[str, ...] = CODINGS) -> str | None:
    """The coding to send from `available`, or None for identity (RFC 9110 §12.5.3).

    The highest q above 0 wins, ties in CODINGS order. Identity is always acceptable unless excluded
    (`identity;q=0` or `*;q=0`), and wins only when the client rates it strictly higher than every coding:
    "gzip;q=0.5" still gets gzip. No Accept-Encoding at all means identity (a client that sends none may not
    decode anything, whatever the RFC allows).
    """
    pairs = accepted(header)
    best: str | None = None
    best_q = 0.0
    for coding in CODINGS:
        if coding not in available:
            continue
        q = _q(pairs, coding)
        if q is not None and q > best_q:
            best, best_q = coding, q
    if best is None:
        return None
    identity = next((q for name, q in pairs if name == "identity"), None)
    return None if identity is not None and identity > best_q else best


def compressible(content_type: str, types: Iterable[str]) -> bool:
    """Whether a media type is in the list (`text/*` covers every text type); parameters are ignored."""
    media = content_type.partition(";")[0].strip().lower()
    return any(pattern == media or (pattern.endswith("/*") and media.startswith(pattern[:-1])) for pattern in types)


def no_transform(cache_control: str) -> bool:
    """RFC 9111 §5.2.2.6: a no-transform origin forbids us to change the content coding."""
    return any(part.strip().lower().partition("=")[0] == "no-transform" for part in cache_control.split(","))


def variant_etag(etag: str, coding: str) -> str:
    """A variant's own strong validator derived from the object's: "abc" -> "abc-br" (W/ kept if weak)."""
    weak = etag.startswith("W/")
    tag = etag[2:] if weak else etag
    if len(tag) >= 2 and tag.startswith('"') and tag.endswith('"'):
        tag = f'"{tag[1:-1]}-{coding}"'
    else:
        tag = f'"{tag}-{coding}"'
    return "W/" + tag if weak else tag


def identity_inm(headers: Mapping[str, str], etag: str) -> Mapping[str, str]:
    """The request headers with any variant's ETag in If-None-Match read as the object's own, so a client
    holding the br bytes and one holding the identity bytes both get their 304 (RFC 9110 §13.1.2)."""
    inm = headers.get("If-None-Match")
    if not inm or inm.strip() == "*":
        return headers
    mapped = {variant_etag(etag, coding): etag for coding in (*CODINGS, "identity")}
    tags = [t.strip() for t in inm.split(",")]
    if not any(t in mapped or t.removeprefix("W/") in mapped for t in tags):
        return headers
    out = dict(headers)
    out["If-None-Match"] = ", ".join(mapped.get(t, mapped.get(t.removeprefix("W/"), t)) for t in tags)
    return out


def worth_compressing(stored: Mapping[str, str], size: int, *, types: Iterable[str], min_size: int) -> bool:
    """Whether variants of this version are made at all: a compressible type, big enough, not already encoded,
    and no no-transform from the origin."""
    return (size >= min_size and compressible(stored.get("Content-Type", ""), types)
            and not no_transform(stored.get("Cache-Control", ""))
            and stored.get("Content-Encoding", "identity").strip().lower() == "identity")


def choose(headers: Mapping[str, str], meta_headers: Iterable[tuple[str, str]], size: int, *, types: Iterable[str],
           min_size: int, enabled: bool) -> Negotiated | None:
    """How to answer: None when the type is not compressible at all (no Vary); otherwise the coding.

    A Range request is answered from the identity body (a range of a variant would need its own validators
    and an offset map nobody wants); an object S3 stores gzip-encoded is sent as is to gzip clients and
    decompressed for the rest, and never recompressed.
    """
    stored = dict(meta_headers)
    if not enabled or not compressible(stored.get("Content-Type", ""), types):
        return None
    if no_transform(stored.get("Cache-Control", "")):
        return None
    accept = headers.get("Accept-Encoding")
    encoding = stored.get("Content-Encoding", "").strip().lower()
    if encoding and encoding != "identity":
        if encoding != "gzip":
            return None  # some other coding S3 stores: passed through as before, never touched
        takes = negotiate(accept, ("gzip",)) == "gzip"
        return Negotiated(coding=None, vary=True, gunzip=not takes)
    if size < min_size or "Range" in headers:
        return Negotiated(coding=None, vary=True)
    return Negotiated(coding=negotiate(accept), vary=True)

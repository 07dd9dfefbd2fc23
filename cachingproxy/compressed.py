"""Responses in a negotiated content coding (encoding.py decides, variants.py makes and finds the bytes):
a stored br/zstd/gzip variant in place of the identity body, or a gzip-stored object decompressed for a
client that does not take gzip. respond.py calls in here only for compressible types."""

from __future__ import annotations

import asyncio
import functools
import os
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import BinaryIO, Final, Literal

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .admission import SecondSight, ThisSecond
from .appkeys import CONFIG, COUNTERS, OBJECT_KEY, SITE
from .conditional import Plan, evaluate
from .config import CompressionConfig
from .encoding import Negotiated, choose, identity_inm, negotiate, variant_etag
from .fill import FileSpan
from .hitpath import send_file
from .models import Entry, HeldBody, ObjectMeta
from .sites import Site

__all__ = ["ON_DISK", "Coded", "coded_headers", "conditional_plan", "count", "gunzipped",
           "memory_variant", "negotiate_for", "negotiation", "pick_variant", "plan_for", "send_coded",
           "variant_in_memory"]

_CHUNK = 256 * 1024
# Per object: each entry keeps an ObjectMeta (with its headers, about 1 KiB) alive. A docs site's hot set is
# hundreds of objects; at 4096 these memos kept filling for the whole of a 10-minute run with new keys.
_MEMO = 1024
# coded_headers' memo: its keys are hitpath.memo_headers' results, which are new every second (Age is in them),
# so only one second's worth is ever used again: it is cleared when the second changes, and when full. Cleared
# only when full, it swung between nothing and 1024 entries, 2.2 MiB per worker (footprint.md, third round).
_HEADERS_MEMO = 1024


def negotiation(request: web.Request, meta: ObjectMeta) -> Negotiated | None:
    return negotiate_for(request.app[CONFIG].compression, request.headers, meta)


def negotiate_for(config: CompressionConfig, headers: Mapping[str, str], meta: ObjectMeta) -> Negotiated | None:
    """None for a type we never compress (no Vary, nothing else to do): the common answer, memoised."""
    if not config.enabled:
        return None
    accept, ranged = headers.get("Accept-Encoding"), "Range" in headers
    # By the meta object's identity first: hashing an ObjectMeta hashes all its headers, on every hit.
    ident = (id(meta), accept, ranged)
    kept = _CHOICES.get(ident)
    if kept is not None and kept[0] is meta:
        return kept[1]
    if _VERSIONS_SEEN.again((meta.etag, accept)):
        choice = _memo_choose(meta, accept, ranged, config.types, config.min_size)
    else:  # a version (and Accept-Encoding) seen once so far, as every cold fill's: not worth an entry yet
        choice = _memo_choose.__wrapped__(meta, accept, ranged, config.types, config.min_size)
    if len(_CHOICES) >= _MEMO:
        _CHOICES.clear()
    _CHOICES[ident] = (meta, choice)
    return choice


_CHOICES: dict[tuple[int, str | None, bool], tuple[ObjectMeta, Negotiated | None]] = {}
# _memo_choose keeps each version's ObjectMeta (its headers) alive: versions asked for once (cold fills) are not
# admitted, so a stream of them cannot keep it filling (admission.py).
_VERSIONS_SEEN = SecondSight()


@functools.lru_cache(maxsize=_MEMO)
def _memo_choose(meta: ObjectMeta, accept: str | None, ranged: bool, types: tuple[str, ...],
                 min_size: int) -> Negotiated | None:
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    if ranged:
        headers["Range"] = ""
    return choose(headers, meta.headers, meta.size, types=types, min_size=min_size, enabled=True)


_HEADERS: dict[tuple[int, str], tuple[CIMultiDictProxy[str], CIMultiDictProxy[str]]] = {}
_HEADERS_SECOND = ThisSecond()


def coded_headers(headers: CIMultiDictProxy[str], coding: str, now: float) -> CIMultiDictProxy[str]:
    """The object's headers for one coding ("identity" with Vary only, "gunzip" for decompressed bytes, or a
    variant's): Vary (RFC 9110 §12.5.5), Content-Encoding, and the variant's own strong ETag. Remembered per
    headers object, which hitpath.memo_headers already shares between hits (checked by identity, not id alone)
    within the second `now` is in, as those objects are.
    """
    if _HEADERS_SECOND.turned(now):
        _HEADERS.clear()
    memo = _HEADERS.get((id(headers), coding))
    if memo is not None and memo[0] is headers:
        return memo[1]
    out = CIMultiDict(headers)
    vary = out.get("Vary", "")
    if "accept-encoding" not in vary.lower():
        out["Vary"] = f"{vary}, Accept-Encoding" if vary.strip() else "Accept-Encoding"
    etag = out.get("ETag")
    if coding == "gunzip":
        out.popall("Content-Encoding", None)
        out.popall("Accept-Ranges", None)  # a Range is ignored for these bytes: the whole body is sent
        if etag:
            out["ETag"] = variant_etag(etag, "identity")
    elif coding != "identity":
        out["Content-Encoding"] = coding
        if etag:
            out["ETag"] = variant_etag(etag, coding)
    made = CIMultiDictProxy(out)
    if len(_HEADERS) >= _HEADERS_MEMO:
        _HEADERS.clear()
    _HEADERS[(id(headers), coding)] = (headers, made)
    return made


def plan_for(request: web.Request, meta: ObjectMeta, size: int, *, conditional: bool, status: int,
             ranged: bool) -> Plan:
    """The conditional plan; a variant's or the object's ETag in If-None-Match both match (encoding.identity_inm).
    `ranged` False: Range is not applied (variants and decompressed bytes are always sent whole)."""
    if not conditional:
        return Plan(status=status, start=0, end=size)
    return conditional_plan(request.method, request.headers, meta, size, ranged=ranged)


def conditional_plan(method: str, request_headers: Mapping[str, str], meta: ObjectMeta, size: int, *,
                     ranged: bool) -> Plan:
    headers = identity_inm(request_headers, meta.etag)
    if not ranged and "Range" in headers:
        headers = {k: v for k, v in headers.items() if k.lower() not in ("range", "if-range")}
    return evaluate(method, headers, etag=meta.etag, last_modified=meta.last_modified, size=size)


class Coded:
    """A chosen variant: its coding and bytes (held in memory, or an open file to sendfile)."""

    __slots__ = ("body", "coding", "size")

    def __init__(self, coding: str, body: HeldBody | BinaryIO) -> None:
        self.coding = coding
        self.body = body
        self.size = len(body) if isinstance(body, HeldBody) else os.fstat(body.fileno()).st_size


def _codings(site: Site, key: str, entry: Entry) -> tuple[str, frozenset[str]] | None:
    present = site.variants.present(key, entry.meta.etag)
    if present is None:
        # The hot path's entries keep their namespaced key (namespace.py): the task that makes variants needs
        # the S3 key. Rebuilt only here: doing it on every compressed hit cost about 1 % of a hot br run's
        # samples (benchmarks/run.py --profile workers --profile-encoding br).
        site.variants.ensure(entry if entry.key == key else replace(entry, key=key))
        return None
    return key, present


def _chosen(site: Site, key: str, accept: str | None, entry: Entry) -> tuple[str, str] | None:
    """(key, coding) of the stored variant this client prefers, or None for identity."""
    found = _codings(site, key, entry)
    if found is None:
        return None
    key, present = found
    coding = negotiate(accept, tuple(sorted(present)))
    return None if coding is None else (key, coding)


# memory_variant's answer for a variant that is stored but not in this worker's memory yet.
ON_DISK: Final = "on disk"


def variant_in_memory(request: web.Request, entry: Entry) -> Coded | Literal["on disk"] | None:
    return memory_variant(request[SITE], request[OBJECT_KEY], request.headers.get("Accept-Encoding"), entry)


def memory_variant(site: Site, key: str, accept: str | None, entry: Entry) -> Coded | Literal["on disk"] | None:
    """The hot path's variant: bytes this worker holds; ON_DISK when the client's coding is stored but not held
    (pick_variant opens it, and keeps it in memory from then on); None for identity (no variant, or not yet
    known: looked for or made in the background). Variants enter memory only once a client asks for that
    coding, so a worker does not hold all three codings of every object (benchmarks/results/footprint.md)."""
    chosen = _chosen(site, key, accept, entry)
    if chosen is None:
        return None
    key, coding = chosen
    data = site.store.variant_in_memory(key, entry.meta.etag, coding)
    return ON_DISK if data is None else Coded(coding, data)


async def pick_variant(request: web.Request, entry: Entry) -> Coded | None:
    chosen = _chosen(request[SITE], request[OBJECT_KEY], request.headers.get("Accept-Encoding"), entry)
    if chosen is None:
        return None
    key, coding = chosen
    body = await request[SITE].store.open_variant(key, entry.meta.etag, coding)
    if body is None:
        request[SITE].variants.lost(key, entry.meta.etag)
        return None
    return Coded(coding, body)


def count(request: web.Request, coding: str, sent: int, identity: int) -> None:
    counters = request.app[COUNTERS]
    counters.add(f"bytes_{coding}", sent)
    counters.add("bytes_saved", max(0, identity - sent))


async def send_coded(request: web.Request, resp: web.StreamResponse, coded: Coded, stall: float) -> None:
    if isinstance(coded.body, HeldBody):
        async with asyncio.timeout(stall):
            await resp.write(coded.body)
    else:
        await send_file(request, coded.body, 0, coded.size, stall)


def _pread(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset)


async def _stored_chunks(body: HeldBody | BinaryIO | None, fill_pieces: AsyncIterator[bytes | FileSpan] | None
                         ) -> AsyncIterator[HeldBody]:
    loop = asyncio.get_running_loop()
    if isinstance(body, HeldBody):
        yield body
    elif body is not None:
        offset = 0
        while chunk := await loop.run_in_executor(None, _pread, body.fileno(), _CHUNK, offset):
            offset += len(chunk)
            yield chunk
    elif fill_pieces is not None:
        async for piece in fill_pieces:
            if isinstance(piece, FileSpan):
                start, end = piece.offset, piece.offset + piece.count
                while start < end:
                    chunk = await loop.run_in_executor(None, _pread, piece.fd, min(_CHUNK, end - start), start)
                    if not chunk:
                        raise ConnectionResetError("cached body shrank while being sent")
                    start += len(chunk)
                    yield chunk
            else:
                yield piece


async def gunzipped(body: HeldBody | BinaryIO | None,
                    fill_pieces: AsyncIterator[bytes | FileSpan] | None) -> AsyncIterator[bytes]:
    """A gzip-stored body decompressed as it is read, a bounded piece at a time (zlib, never our own code)."""
    inflater = zlib.decompressobj(wbits=31)
    async for chunk in _stored_chunks(body, fill_pieces):
        data = inflater.decompress(chunk, _CHUNK)
        while data:
            yield data
            data = inflater.decompress(inflater.unconsumed_tail, _CHUNK) if inflater.unconsumed_tail else b""
    tail = inflater.flush()
    if tail:
        yield tail


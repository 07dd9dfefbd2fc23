"""Fresh hits answered below aiohttp's web layer (issue 16): the one place the proxy reaches into aiohttp's
connection handling, so it is small, and everything it cannot answer exactly as the ordinary path would goes
to that path untouched.

Why: for a hot hit, aiohttp's per-request machinery (a Request, a task, middleware, the handler, a Response,
headers serialised each time, the response hook, the access logger's lookups) cost more CPU than the hit itself
(benchmarks/results/fast-hits.md). What a fresh GET of a small body this worker holds in memory needs is
its header block, made once per object version and second (only X-Request-Id differs per response), and the
body: one write.

How: aiohttp still parses every byte (its own parser, C or Python, with all its limits). `FastRequestHandler`
wraps that parser on each connection of an app that has `FAST_HITS`. While aiohttp has no request of that
connection in progress or queued, each parsed request `FastHits.answer` can answer is written at once; the
first it cannot, and every request after it in the same read, are handed to aiohttp in order, so responses
never overtake each other. `answer` takes only plain GETs (HTTP/1.1, keep-alive, no body, no Range, If-Match,
If-Unmodified-Since or Upgrade, origin-form path outside the monitoring and admin routes, a site without
[sites.access]) of a fresh entry whose body (or chosen variant) is in this worker's memory, and answers 200 or
304 with the same status, headers and body the ordinary path sends (tests/test_fasthit.py compares both),
counts it, and logs it the same way.

Cost: it depends on aiohttp's RequestHandler internals (`_parser`, `_waiter`, `_messages`, the keep-alive
fields; aiohttp is pinned below 3.15), and answers are written without waiting for the client to read, so a
connection whose write buffer is not empty goes to aiohttp, which waits. `[server] fast_hits = false` turns
it off.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import Any, Literal

from aiohttp import HttpVersion11, hdrs, web, web_server
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import _serialize_headers  # aiohttp's own header encoder and injection check
from aiohttp.streams import EmptyStreamReader
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy, istr

from .access_rules import parse_networks
from .accessline import request_id_from
from .accesslog import StructuredAccessLogger
from .admission import ThisSecond
from .appkeys import CLOCK, CONFIG, COUNTERS, EVENTS_HEALTH, SITES
from .compressed import ON_DISK, Coded, coded_headers, conditional_plan, memory_variant, negotiate_for
from .conditional import evaluate
from .encoding import Negotiated
from .forwarded import forwarded
from .freshness import ClientFreshness, age, client_freshness
from .headers import SERVER, not_modified
from .hitpath import memo_request_key
from .keys import Key
from .models import Entry, HeldBody, Outcome
from .monitoring import OPS
from .policy import ttl_left, windows_for
from .respond import response_headers
from .service import FromCache
from .sites import Site

__all__ = ["FAST_HITS", "FastHits", "FastRequestHandler", "enable_fast_hits", "install"]

log = logging.getLogger(__name__)

# Headers whose answer may be a range, a 412, a protocol switch or a 100 Continue: the ordinary path decides.
# aiohttp's istr names: a case-insensitive lookup with one needs no case folding of the name per request.
_HANDED_ON = (hdrs.RANGE, hdrs.IF_RANGE, hdrs.IF_MATCH, hdrs.IF_UNMODIFIED_SINCE, hdrs.UPGRADE, hdrs.EXPECT)
_X_REQUEST_ID = istr("X-Request-Id")
_SPLICED = frozenset({"age", "cache-status"})  # _template's; a site that sets either itself gets none
_REASONS = {200: "OK", 304: "Not Modified"}
_BACKLOG = 64 * 1024  # bytes a connection may have unsent before its hits wait for the client (aiohttp's way)
_SHAPE_MAX = 1024  # characters of a request shape worth remembering (FastHits._answers): longer ones are
# worked out each time, so hostile paths and headers cannot make the memo large.
_BLOCKS = 1024  # header blocks remembered within one second; cleared whole when full. Keyed by memo_headers'
# results, new every second (Age is in them): so the memo is also cleared when the second changes, since a block
# of an earlier second is never asked for again; kept, 1024 of them took minutes to accumulate, growing all the
# while (issue 16, a smaller footprint: benchmarks/results/footprint.md, "Third round: growth").


class _Answer:
    """What `FastHits.answer` worked out for one request shape (Host, path, and the request headers the answer
    reads) and one in-memory entry of its object: used again for the same shape while the entry, its coding
    (and body length) and the TTL cap stay the same, which is what the status, the headers and the counts
    depend on besides Age and the TTL left (spliced in per response: `_template`). Per request only the
    freshness and memory checks, those two numbers, the request id and the log line's time, latency, client
    and user agent are new."""

    __slots__ = ("age", "amounts", "block", "cap", "cells", "client_rules", "coded", "coding", "entry", "key", "left",
                 "length", "neg", "path", "plain_amounts", "plain_cells", "relative", "sent", "site", "status", "stem",
                 "template", "ttl")

    def __init__(self, site: Site, key: str, relative: str, ttl: float, cap: float | None,
                 client_rules: ClientFreshness, path: str) -> None:
        self.site, self.key, self.relative, self.ttl, self.cap = site, key, relative, ttl, cap
        self.client_rules, self.path = client_rules, path
        self.entry: Entry | None = None  # the rest is set by FastHits._work_out for this entry
        self.age = self.left = self.length = 0  # the Age and TTL left `block` says; the body's length
        self.template: tuple[bytes, bytes, bytes, bool] | None = None  # `_template(block, ...)`
        self.neg: Negotiated | None = None
        self.coding: str | None = None
        self.coded: Coded | None = None  # the variant sent, while `entry` is the same: its bytes never change
        self.status = 0
        self.block = b""  # the head up to the request id, when there is no template
        self.sent = 0
        self.cells: tuple[int, ...] = ()  # what _count adds besides the latency (with a StructuredAccessLogger)
        self.amounts: tuple[int, ...] = ()
        self.plain_cells: tuple[int, ...] = ()  # ... and without one
        self.plain_amounts: tuple[int, ...] = ()
        self.stem: tuple[str, str | None, str, str] | None = None  # the log line's, for one client and agent


class FastHits:
    """One app's fast answers. Built once the app has started (its sites, store and monitoring exist)."""

    def __init__(self, app: web.Application) -> None:
        config = app[CONFIG]
        self._sites = app[SITES]
        self._clock = app[CLOCK]
        self._ops = app[OPS]
        self._counters = app[COUNTERS]
        self._events = app.get(EVENTS_HEALTH)
        self._fallback_ttl = config.events.fallback_ttl
        self._compression = config.compression
        trusted = config.server.trusted_proxies
        self._trusted = parse_networks(trusted) if trusted else None
        self._reserved = _reserved_paths(app)
        self._blocks: dict[tuple[int, int, str], tuple[CIMultiDictProxy[str], bytes]] = {}
        self._blocks_second = ThisSecond()  # the blocks in _blocks are only good within it
        self._answers: dict[tuple[str, str, str | None, str | None, str | None], _Answer] = {}
        # An answer is made for one in-memory entry, and after a write anywhere (hot.Stamp) this worker drops
        # them all: each answer would be worked out again, so it goes with them instead of keeping a stale entry
        # and head alive. Kept, a mix with cold fills (new entries all the time) grew them slowly towards
        # _BLOCKS, 2-3 KiB each (benchmarks/results/footprint.md, "Third round: growth").
        for site in self._sites:
            site.store.on_memory_dropped(self._answers.clear)
        self.answered = 0  # this worker's, since start (tests)

    def answer(self, message: RawRequestMessage, payload: object, handler: FastRequestHandler) -> bool:
        """Answer `message` on `handler`'s connection and return True, or return False having sent nothing
        and counted nothing (the ordinary path then answers it)."""
        started = perf_counter()
        if (message.method != "GET" or message.version != HttpVersion11 or message.should_close
                or message.upgrade or type(payload) is not EmptyStreamReader):
            return False
        headers = message.headers
        for name in _HANDED_ON:
            if name in headers:
                return False
        raw = message.path
        host = headers.get(hdrs.HOST)
        client = handler.client
        if self._trusted is not None:
            found = forwarded(client, headers, self._trusted)
            if found is not None:
                client = found.client
                host = found.host or host
        if host is None:
            return False
        now = self._clock()
        cap = None if self._events is None or self._events.ok else self._fallback_ttl
        accept = headers.get(hdrs.ACCEPT_ENCODING)
        # Everything the answer reads from the request besides what only the log line needs: headers.get is
        # what negotiate_for, memory_variant and conditional.evaluate read (each header's first value).
        shape = (host, raw, accept, headers.get(hdrs.IF_NONE_MATCH), headers.get(hdrs.IF_MODIFIED_SINCE))
        known = self._answers.get(shape)
        if known is None or known.cap != cap:
            known = self._route(host, raw, cap)
            if known is None:
                return False
        found_in_memory = known.site.service.fresh_in_memory(known.key, known.ttl, now)
        if found_in_memory is None:
            return False
        entry, body = found_in_memory
        same = entry is known.entry
        neg = known.neg if same else negotiate_for(self._compression, headers, entry.meta)
        if entry.meta.redirect or (neg is not None and neg.gunzip):
            return False
        coded: Coded | Literal["on disk"] | None
        if same and known.coded is not None:
            coded = known.coded  # a variant of this very version (a new one is a new entry): no lookup
        else:
            coded = memory_variant(known.site, known.key, accept, entry) if neg is not None and neg.coding else None
        if coded == ON_DISK:
            return False  # the ordinary path reads it in (compressed.pick_variant), for the hits after this
        if coded is not None:
            assert isinstance(coded.body, HeldBody)
            body = coded.body
        # Age and the TTL left change every second, at different instants: spliced into the head (_Answer.
        # template), or, where a site's own headers replace them, the answer is worked out again when they change.
        age_now, left = age(entry.checked_at, now), int(ttl_left(entry, known.ttl, now))
        if (not same or (None if coded is None else coded.coding) != known.coding or len(body) != known.length
                or (known.template is None and (age_now != known.age or left != known.left))):
            if not self._work_out(known, entry, body, age_now, left, neg, coded, headers, now):
                return False
            if sum(len(part or "") for part in shape) <= _SHAPE_MAX:
                self._answers[shape] = known
                if len(self._answers) > _BLOCKS:
                    self._answers.clear()
        request_id = request_id_from(headers.get(_X_REQUEST_ID))
        status = known.status
        # Counted and logged before the write, so that nothing after it can fail: an exception before the
        # write hands the request on (_Filter) without a second response. The latency is the answer's own;
        # the write that follows is one non-blocking send of at most a hot body (hot.HOT_BODY_MAX).
        logger = handler.access_logger
        counters = self._counters
        if isinstance(logger, StructuredAccessLogger):  # as the ordinary path, which counts in its logger
            seconds = perf_counter() - started
            site_name = known.site.name
            cells, amounts = self._ops.metrics.observed("HIT", seconds, site_name)
            counters.add_cells(cells + known.cells, amounts + known.amounts)
            if logger.writes_lines():
                user_agent = headers.get(hdrs.USER_AGENT)
                if logger.log_format == "json":
                    stem = known.stem
                    if stem is None or stem[0] != client or stem[1] != user_agent:
                        stem = known.stem = (client, user_agent, *logger.json_stem(
                            site=site_name, client=client, method="GET", path=known.path, status=status,
                            size=known.sent, cache="HIT", s3=None, user_agent=user_agent))
                    logger.token_line(stem[2], stem[3], seconds, request_id)
                else:
                    logger.line(site=site_name, client=client, method="GET", path=raw, version=message.version,
                                status=status, size=known.sent, cache="HIT", seconds=seconds, s3=None,
                                user_agent=user_agent, referer=headers.get(hdrs.REFERER), request_id=request_id)
        else:
            counters.add_cells(known.plain_cells, known.plain_amounts)
        self.answered += 1
        transport = handler.transport
        assert transport is not None
        # One buffer: uvloop sends a single one with one try-write, where writelines queues a writev request.
        template = known.template
        if template is None:
            parts: tuple[bytes, ...] = (known.block, request_id.encode(), b"\r\n\r\n")
        else:
            first, second = (age_now, left) if template[3] else (left, age_now)
            parts = (template[0], b"%d" % first, template[1], b"%d" % second, template[2], request_id.encode(),
                     b"\r\n\r\n")
        transport.write(b"".join((*parts, body)) if status == 200 else b"".join(parts))
        return True

    def _route(self, host: str, raw: str, cap: float | None) -> _Answer | None:
        """Which site and object a request is for, and its TTL; None when this path does not answer it."""
        if raw[:1] != "/" or raw.startswith(self._reserved):
            return None
        site = self._sites.route(host, raw)
        if site is None or site.access is not None:
            return None
        config = site.config
        key = memo_request_key(raw, config.mount, config.s3.prefix, config.cache.index_document, noted=False)
        if not isinstance(key, Key):
            return None
        relative = key.s3_key[len(config.s3.prefix):]
        ttl = windows_for(relative, config.cache, cap).ttl
        client_rules = client_freshness(relative, config.cache.rules, config.cache.client_cache_control)
        return _Answer(site, key.s3_key, relative, ttl, cap, client_rules, raw.partition("?")[0].partition("#")[0])

    def _work_out(self, known: _Answer, entry: Entry, body: HeldBody, age_now: int, left: int,
                  neg: Negotiated | None, coded: Coded | None, headers: CIMultiDictProxy[str], now: float) -> bool:
        """Fill `known` in for `entry` (whose identity or variant `body` is sent): status, head and counts,
        exactly as the ordinary path makes them; False when this path does not answer it."""
        meta = entry.meta
        head = response_headers(FromCache(entry, Outcome.HIT, body), known.ttl, known.client_rules, now)
        if neg is None:
            plan = evaluate("GET", headers, etag=meta.etag, last_modified=meta.last_modified, size=meta.size)
        elif coded is None:
            head = coded_headers(head, "identity", now)
            plan = conditional_plan("GET", headers, meta, meta.size, ranged=True)
        else:
            head = coded_headers(head, coded.coding, now)
            plan = conditional_plan("GET", headers, meta, coded.size, ranged=False)
        status = plan.status
        block = self._block(head, status, known.site, len(body), int(now)) \
            if status in _REASONS and not plan.content_range else None
        if block is None:
            return False
        sent = len(body) if status == 200 else 0
        coding = None if coded is None else coded.coding
        known.entry, known.neg, known.coding, known.coded, known.length = entry, neg, coding, coded, len(body)
        known.age, known.left, known.status, known.sent, known.stem = age_now, left, status, sent, None
        replaced = _SPLICED & {name.lower() for name, _ in known.site.config.headers}  # [sites.headers]
        known.template = None if replaced else _template(block, head, age_now, left)
        # The block itself only where there is no template: up to _BLOCKS answers stay in each worker's
        # memory (issue 16's footprint), and a head is 0.5-1 KiB.
        known.block = block if known.template is None else b""
        known.cells, known.amounts = self._counted(known.site.name, True, sent, coding, meta.size)
        known.plain_cells, known.plain_amounts = self._counted(known.site.name, False, sent, coding, meta.size)
        return True

    def _counted(self, site: str, logged: bool, sent: int, coding: str | None, identity: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """What the ordinary path counts for this hit besides its latency (service.hit_in_memory,
        compressed.count and, with `logged`, the access logger's log), as cells added under one lock with
        the latency's: three locked adds per hit cost more than the rest of them."""
        counters = self._counters
        cells = hits = counters.cells(site, "hits")
        amounts = (1,) * len(hits)
        if sent and logged:  # bytes served are the access logger's count (none without one)
            served = counters.cells(site, "bytes_served")
            cells, amounts = cells + served, amounts + (sent,) * len(served)
        if sent and coding is not None:
            coded, saved = counters.cells(site, f"bytes_{coding}"), counters.cells(site, "bytes_saved")
            cells += coded + saved
            amounts += (sent,) * len(coded) + (max(0, identity - sent),) * len(saved)
        return cells, amounts

    def _block(self, head: CIMultiDictProxy[str], status: int, site: Site, length: int, second: int) -> bytes | None:
        """The response head up to the request id, as the ordinary path writes it: made once per headers
        object (itself remembered per object version and second, hitpath.memo_headers) and status."""
        if self._blocks_second.turned(second):
            self._blocks.clear()
        ident = (id(head), status, site.name)
        kept = self._blocks.get(ident)
        if kept is not None and kept[0] is head:
            return kept[1]
        if status == 200:
            out = CIMultiDict(head)
            out.setdefault("Content-Type", "application/octet-stream")  # as web.Response does for bytes
            out["Content-Length"] = str(length)
        else:
            out = not_modified(head)
        out.setdefault("Server", SERVER)
        out.update(site.config.headers)  # [sites.headers], as app._on_prepare applies them
        out.popall("X-Request-Id", None)
        try:
            encoded = _serialize_headers(f"HTTP/1.1 {status} {_REASONS[status]}", out)
        except ValueError:  # a control character in a stored header: the ordinary path says what happens
            return None
        block = encoded[:-2] + b"X-Request-Id: "  # the request id ends the head
        if len(self._blocks) >= _BLOCKS:
            self._blocks.clear()
        self._blocks[ident] = (head, block)
        return block


def _reserved_paths(app: web.Application) -> tuple[str, ...]:
    """Path prefixes the app routes elsewhere than to the sites (monitoring, the admin API): never answered
    here, even by a site mounted at "/"."""
    out = []
    for resource in app.router.resources():
        canonical = resource.canonical
        if canonical != "/{tail}":  # the sites' catch-all
            out.append(canonical.partition("{")[0])
    return tuple(out)


def _template(block: bytes, head: CIMultiDictProxy[str], age_now: int, left: int
              ) -> tuple[bytes, bytes, bytes, bool] | None:
    """`block` cut around its two numbers that change by the second, Age and the TTL left in Cache-Status
    (headers.object_headers: `Age: {age}`, `Cache-Status: ...; ttl={left}`; nothing else in a head depends
    on them): (before the first, between, after the second, whether Age comes first). None when the head does
    not say them exactly once each as object_headers writes them."""
    status = head.get("Cache-Status", "")
    if head.get("Age") != str(age_now) or not status.endswith(f"; ttl={left}"):
        return None
    age_line = b"\r\nAge: %d\r\n" % age_now
    status_line = b"\r\nCache-Status: %s\r\n" % status.encode()
    if block.count(age_line) != 1 or block.count(status_line) != 1:
        return None
    age_at = block.index(age_line) + len(b"\r\nAge: ")
    age_end = age_at + len(str(age_now))
    left_end = block.index(status_line) + len(status_line) - 2
    left_at = left_end - len(str(left))
    if age_at < left_at:
        return block[:age_at], block[age_end:left_at], block[left_end:], True
    return block[:left_at], block[left_end:age_at], block[age_end:], False


FAST_HITS = web.AppKey("fast_hits", FastHits)


class FastRequestHandler(RequestHandler):
    """aiohttp's connection handler, with its parser wrapped for `FastHits` when the app has them."""

    __slots__ = ("_fast", "client")

    def __init__(self, manager: web_server.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.client = ""
        owner = getattr(manager.request_handler, "__self__", None)
        self._fast = owner.get(FAST_HITS) if isinstance(owner, web.Application) else None
        if self._fast is not None:
            self._parser = _Filter(self._parser, self, self._fast)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, list | tuple) else str(peer or "")  # as request.remote

    def idle(self) -> bool:
        """True while aiohttp waits for this connection's next request: nothing in progress, nothing queued,
        and nothing unsent."""
        waiter = self._waiter
        transport = self.transport
        return (waiter is not None and not waiter.done() and not self._messages and not self._force_close
                and not self._close and transport is not None
                and transport.get_write_buffer_size() < _BACKLOG)

    def answered(self, count: int) -> None:
        """What aiohttp does after a response it wrote: count it and restart the keep-alive timer."""
        if self._manager is not None:
            self._manager.requests_count += count
        if self._keepalive_timeout > 0:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time,
                                                            self._process_keepalive)


class _Filter:
    """aiohttp's request parser as `FastRequestHandler` sees it: parsed requests the fast path answered are
    taken out of what aiohttp gets (and given back to the parser's queue count)."""

    __slots__ = ("_fast", "_handler", "_parser")

    def __init__(self, parser: Any, handler: FastRequestHandler, fast: FastHits) -> None:
        self._parser = parser
        self._handler = handler
        self._fast = fast

    def feed_data(self, data: bytes) -> Any:
        parser, handler = self._parser, self._handler
        messages, upgraded, tail = parser.feed_data(data)
        if not messages or not handler.idle():
            return messages, upgraded, tail
        handed: list[Any] = []  # for aiohttp: everything from the first request not answered here on
        idle = True  # just checked
        unconsumed = 0  # the parser's requests nobody has taken yet: none while aiohttp is idle
        while messages:
            fed = len(messages)
            if handed:
                handed.extend(messages)
            else:
                answered = 0
                for message, payload in messages:
                    if not (idle or handler.idle()) or not self._answer(message, payload):
                        break
                    idle = False  # a write may have filled the connection's buffer: ask before the next
                    answered += 1
                    parser.message_consumed()
                if answered:
                    handler.answered(answered)
                handed = list(messages[answered:])
            # The parser stops after a queue's worth of unconsumed requests and keeps the rest of the read
            # until asked again, which aiohttp does only when its queue was full (it then pauses reading and
            # asks as the queue drains). Requests answered here never reach that queue, so ask now, until
            # aiohttp has a full queue and its own flow control takes over. The parser has stopped only if
            # this feed brought its unconsumed requests to a queue's worth: otherwise there is nothing to ask.
            if upgraded or len(handed) >= MAX_MSG_QUEUE_SIZE or unconsumed + fed < MAX_MSG_QUEUE_SIZE:
                break
            unconsumed = len(handed)
            messages, upgraded, tail = parser.feed_data(b"")
        return handed, upgraded, tail

    def _answer(self, message: RawRequestMessage, payload: object) -> bool:
        try:
            return self._fast.answer(message, payload, self._handler)
        except Exception:
            # A defect here must cost this request its shortcut, not its connection (an exception out of
            # data_received makes the loop drop it): the ordinary path answers instead.
            log.exception("fast hit failed; the request goes the ordinary way")
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


async def enable_fast_hits(app: web.Application) -> None:
    """on_startup, after the cleanup contexts opened the sites, the store and monitoring."""
    if app[CONFIG].server.fast_hits:
        app[FAST_HITS] = FastHits(app)


def install() -> None:
    """Make aiohttp's servers build `FastRequestHandler`s (process-wide, once; inert for apps without
    FAST_HITS, such as the admin and redirect listeners). aiohttp's Server looks the class up in its module
    at each connection, and offers no parameter for it."""
    setattr(web_server, "RequestHandler", FastRequestHandler)  # noqa: B010 (not exported: mypy)

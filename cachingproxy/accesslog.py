"""The access log: one JSON line per response, and the measurements taken once the response is sent."""

from __future__ import annotations

import collections
import json
import logging
from time import perf_counter

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .appkeys import BODY_SENT, S3_CALLS, SITE, STARTED
from .counters import S3_CALLS as CURRENT_S3_CALLS
from .counters import SITE as SITE_NAME
from .monitoring import OPS

__all__ = ["StructuredAccessLogger", "track_s3_calls"]


def track_s3_calls(request: web.Request) -> None:
    """Attribute the S3 requests made from here on (in this request's task and the tasks it spawns) to it."""
    calls: collections.Counter[str] = collections.Counter()
    request[S3_CALLS] = calls
    CURRENT_S3_CALLS.set(calls)  # each request runs in its own task, so this ends with the request


class StructuredAccessLogger(AbstractAccessLogger):
    """After each response is sent: its latency by X-Cache and the object bytes it delivered go to the
    metrics, and one JSON line (method, path, status, bytes, cache, ms, s3: the S3 requests it caused) to
    the log. Latency runs to the end of the send, from the object handler's STARTED stamp (or, for other
    routes, from aiohttp's own start, which has millisecond resolution under uvloop).

    So every listener that serves the proxy must use this class (`app.server_kwargs` passes it). The path
    is logged without its query string and no header is logged, so neither can leak a token.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        started = request.get(STARTED)
        if started is not None:
            time = perf_counter() - started
        outcome = response.headers.get("X-Cache")
        delivered = request.get(BODY_SENT)
        try:
            ops = request.config_dict.get(OPS) if isinstance(request, web.Request) else None
        except (AssertionError, AttributeError):  # refused by aiohttp before routing: no app to count in
            ops = None
        site = request.get(SITE)
        site_name = site.name if site is not None else None
        if ops is not None:
            ops.metrics.observe(outcome, time, site_name)
            if delivered:
                token = SITE_NAME.set(site_name)  # the logger runs outside the request's context
                try:
                    ops.counters.add("bytes_served", delivered)
                finally:
                    SITE_NAME.reset(token)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if delivered is None:  # not an object response: whatever body it had in full, none for HEAD
            delivered = (response.content_length or 0) if isinstance(response, web.Response) and \
                request.method != "HEAD" else 0
        calls = request.get(S3_CALLS)
        path = request.raw_path.partition("?")[0].partition("#")[0]
        # Formatted by hand: json.dumps of the whole dict cost more than the rest of a cached hit's logging.
        self.logger.info(
            '{"site":%s,"method":%s,"path":%s,"status":%d,"bytes":%d,"cache":%s,"ms":%.1f,"s3":%s}',
            json.dumps(site_name or "-"), json.dumps(request.method), json.dumps(path), response.status, delivered,
            json.dumps(outcome or "-"), time * 1000, json.dumps(dict(calls), separators=(",", ":")) if calls else "{}")

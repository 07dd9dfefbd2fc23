"""The access log: one line per response (accessline.py), and the measurements taken once it is sent."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from time import perf_counter
from time import time as wall_clock

from aiohttp import HttpVersion, web
from aiohttp.abc import AbstractAccessLogger

from .accessline import combined_line, json_line, json_stem, new_request_id, request_id_from, stem_line
from .appkeys import BODY_SENT, CLIENT, S3_CALLS, SITE, STARTED
from .counters import S3_CALLS as CURRENT_S3_CALLS
from .counters import SITE as SITE_NAME
from .logsetup import access_lines
from .monitoring import OPS

__all__ = ["StructuredAccessLogger", "request_id", "track_s3_calls"]


def track_s3_calls(request: web.Request) -> None:
    """Attribute the S3 requests made from here on (in this request's task and the tasks it spawns) to it."""
    calls: collections.Counter[str] = collections.Counter()
    request[S3_CALLS] = calls
    CURRENT_S3_CALLS.set(calls)  # each request runs in its own task, so this ends with the request


class StructuredAccessLogger(AbstractAccessLogger):
    """After each response is sent: its latency by X-Cache and the object bytes it delivered go to the
    metrics, and one line to the log, in the format `[server] access_log` names (aiohttp hands it over as
    `access_log_format`, see `app.server_kwargs`): "json" (accessline.json_line: time, site, client, method, path,
    status, bytes, cache, ms, s3: the S3 requests it caused, ua, id: the X-Request-Id sent), "combined"
    (Apache/nginx), or "off" (measured, not logged). Latency runs to the end of the send, from the object
    handler's STARTED stamp (or, for other routes, from aiohttp's own start, which has millisecond resolution
    under uvloop).

    So every listener that serves the proxy must use this class (`app.server_kwargs` passes it). The path
    and referer are logged without their query strings and no other header is logged, so none can leak a token.
    """

    _lines: Callable[[str], None] | None = None  # where finished lines go (logsetup.access_lines)
    _direct = False  # _lines is the batching handler's, not _via_logger

    def _via_logger(self, line: str) -> None:
        self.logger.info("%s", line)

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
        if not self.writes_lines():
            return
        if delivered is None:  # not an object response: whatever body it had in full, none for HEAD
            delivered = (response.content_length or 0) if isinstance(response, web.Response) and \
                request.method != "HEAD" else 0
        headers = request.headers
        self.line(
            site=site_name, client=request.get(CLIENT) or request.remote or "",  # forwarded.py may say who
            method=request.method, path=request.raw_path, version=request.version, status=response.status,
            size=delivered, cache=outcome, seconds=time, s3=request.get(S3_CALLS), user_agent=headers.get("User-Agent"),
            referer=headers.get("Referer"),
            # Set with the X-Request-Id header as the response was prepared; aiohttp's own 400s never were.
            request_id=response.headers.get("X-Request-Id"))

    def writes_lines(self) -> bool:
        if self._direct:  # the common answer first: one attribute, every response asks
            return True
        if self.log_format == "off":
            return False
        if self._lines is None:
            # Resolved at the first line, not in __init__: workers route the logger through the batching
            # handler (logsetup.logging_off_the_loop) after aiohttp has made this object.
            direct = access_lines(self.logger)
            self._lines = direct if direct is not None else self._via_logger
            self._direct = direct is not None
        elif not self.logger.isEnabledFor(logging.INFO):  # through the logger: its level may change
            return False
        return True

    def line(self, *, site: str | None, client: str, method: str, path: str, version: HttpVersion, status: int,
             size: int, cache: str | None, seconds: float, s3: Mapping[str, int] | None, user_agent: str | None,
             referer: str | None, request_id: str | None) -> None:
        """One line in the configured format (call `writes_lines` first). The path and referer lose their
        query strings."""
        assert self._lines is not None
        path = path.partition("?")[0].partition("#")[0]
        if self.log_format == "combined":
            self._lines(combined_line(
                when=wall_clock(), client=client, method=method, path=path,
                version=f"HTTP/{version.major}.{version.minor}", status=status, size=size, referer=referer or "",
                user_agent=user_agent or ""))
            return
        self._lines(json_line(
            when=wall_clock(), site=site or "-", client=client, method=method, path=path, status=status, size=size,
            cache=cache or "-", ms=seconds * 1000, s3=s3 or {}, user_agent=user_agent or "",
            request_id=request_id or new_request_id()))

    def json_stem(self, *, site: str | None, client: str, method: str, path: str, status: int, size: int,
                  cache: str | None, s3: Mapping[str, int] | None, user_agent: str | None) -> tuple[str, str]:
        """What `line` writes in the JSON format besides the time, latency and id, for `token_line`; `path`
        without its query string. For a caller that writes many lines of the same shape (fasthit.py)."""
        return json_stem(site=site or "-", client=client, method=method, path=path, status=status, size=size,
                         cache=cache or "-", s3=s3 or {}, user_agent=user_agent or "")

    def token_line(self, middle: str, end: str, seconds: float, request_id: str) -> None:
        """`line` in the JSON format (call `writes_lines` first), from `json_stem`'s parts, for a request id
        from accessline.request_id_from (a token: quoted as json.dumps would quote it)."""
        assert self._lines is not None
        self._lines(stem_line(middle, end, wall_clock(), seconds * 1000, f'"{request_id}"'))


async def request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response the app makes says its request id (the access log's `id`)."""
    response.headers["X-Request-Id"] = request_id_from(request.headers.get("X-Request-Id"))

"""Request forms the HTTP parser lets through or answers on its own, made strict (issue 17 items 4-6).

- `request_forms`, the outermost middleware: an absolute-form target is served like its origin-form path, its
  authority replacing Host (RFC 9112 §3.2.2); CONNECT and the asterisk-form get 405/400 (keys.request_target);
  an HTTP/0.9 request line (no version), which aiohttp's C parser answers as HTTP/0.9, gets 400 and a close.
- `quiet_parse_errors`: a request aiohttp's parser refuses is answered by aiohttp itself, with a body that
  quotes the offending bytes (an `Authorization` header with a stray control character: the token, echoed).
  Its body becomes one fixed line; logsetup.OneLineBadRequests keeps the log line to the error kind and client.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from .keys import BadTarget, request_target

__all__ = ["BAD_REQUEST_BODY", "quiet_parse_errors", "request_forms"]

BAD_REQUEST_BODY = "Bad Request\n"
_ALLOWED = ("GET", "HEAD")
_HTTP_1_0 = (1, 0)


@web.middleware
async def request_forms(request: web.Request, handler: Handler) -> web.StreamResponse:
    raw = request.raw_path
    if raw.startswith("/") and request.version >= _HTTP_1_0 and request.method != "CONNECT":
        return await handler(request)  # origin-form: nearly every request, at the cost of three comparisons
    if request.version < _HTTP_1_0:
        # RFC 9112 §2.3 / Appendix C.1: HTTP/0.9 has no headers and no status line; answering one in kind
        # (as aiohttp's C parser lets us) puts a header-less body on a connection a proxy may reuse.
        raise _closing(web.HTTPBadRequest(text="Bad Request: HTTP/0.9 is not supported\n"))
    form = request_target(request.method, raw)
    if isinstance(form, BadTarget):
        if form.status == 405:
            # A CONNECT client may send its tunnel's bytes (TLS) right behind the request: never read them.
            raise _closing(web.HTTPMethodNotAllowed(request.method, _ALLOWED, text=f"{form.reason}\n"))
        raise _closing(web.HTTPBadRequest(text=f"Bad Request: {form.reason}\n"))
    if form.authority is None:
        return await handler(request)
    headers = request.headers.copy()
    headers["Host"] = form.authority
    # encoded=True: the path is passed on byte for byte, so keys.py sees what an origin-form request shows
    # (its `..`, `//` and escapes), not a normalised copy.
    forwarded = request.clone(rel_url=URL(form.target, encoded=True), headers=headers)
    try:
        return await handler(forwarded)
    finally:
        # The access logger is handed the request aiohttp made, not this copy (clone copies its state): what
        # the handler noted on it (latency start, bytes sent, S3 calls) goes back to the original.
        request.update(forwarded)


def _closing(exc: web.HTTPException) -> web.HTTPException:
    exc.force_close()
    return exc


def quiet_parse_errors() -> None:
    """Make aiohttp's answer to a request its parser refused say only BAD_REQUEST_BODY (process-wide, once).

    aiohttp has no hook for this answer: it is built in `RequestHandler.handle_error` from the parser's
    message, which quotes the raw request line or header. Wrapping that method is the narrowest change: only
    parse errors (HttpProcessingError) are touched, status and closing stay aiohttp's. tests/test_request_forms.py
    proves it against `cachingproxy serve` on both parsers, so an aiohttp upgrade that changes the method fails there.
    """
    original = RequestHandler.handle_error
    if getattr(original, "_quiet", False):
        return

    def handle_error(self: RequestHandler, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            message = BAD_REQUEST_BODY
        return original(self, request, status, exc, message)

    handle_error._quiet = True  # type: ignore[attr-defined]
    setattr(RequestHandler, "handle_error", handle_error)  # noqa: B010 (mypy refuses assigning to a method)

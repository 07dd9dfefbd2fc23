"""`[server] trusted_proxies`: the client's address, scheme and host as a trusted load balancer reports them.

Installed only when the list is not empty, so a proxy without a load balancer pays nothing. From a peer
outside the list, X-Forwarded-For, -Proto and -Host are ignored (and never echoed): anyone can send them.
"""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .access_rules import Networks, client_address, in_networks
from .appkeys import CLIENT

__all__ = ["forwarded_middleware"]

_SCHEMES = frozenset({"http", "https"})
# A host[:port] as a Host header may carry it (RFC 9110 §7.2): nothing that could change a path or a header.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?\Z")


def _last(value: str | None) -> str:
    """The right-most entry of a comma list: the one the nearest (trusted) proxy added."""
    return (value or "").rpartition(",")[2].strip()


def forwarded_middleware(trusted: Networks) -> Middleware:
    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote or ""
        if not in_networks(peer, trusted):
            return await handler(request)
        client = client_address(peer, request.headers.getall("X-Forwarded-For", ()), trusted)
        # On the request aiohttp made: the access logger is handed that one, not the copy below.
        request[CLIENT] = client
        changes: dict[str, str] = {"remote": client}
        scheme = _last(request.headers.get("X-Forwarded-Proto")).lower()
        if scheme in _SCHEMES:
            changes["scheme"] = scheme
        host = _last(request.headers.get("X-Forwarded-Host"))
        if _HOST.match(host):
            changes["host"] = host  # routing (sites' hosts) and any absolute URL use the name the client used
        view = request.clone(**changes)  # type: ignore[arg-type]
        try:
            return await handler(view)
        finally:
            request.update(view)  # what the handler noted (site, bytes sent, S3 calls) is for the access log

    return forwarded

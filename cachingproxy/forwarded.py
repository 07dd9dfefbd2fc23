"""`[server] trusted_proxies`: the client's address, scheme and host as a trusted load balancer reports them.

Installed only when the list is not empty, so a proxy without a load balancer pays nothing. From a peer
outside the list, X-Forwarded-For, -Proto and -Host are ignored (and never echoed): anyone can send them.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDictProxy

from .access_rules import Networks, client_address, in_networks
from .appkeys import CLIENT

__all__ = ["Forwarded", "forwarded", "forwarded_middleware"]

_SCHEMES = frozenset({"http", "https"})
# A host[:port] as a Host header may carry it (RFC 9110 §7.2): nothing that could change a path or a header.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?\Z")


def _last(value: str | None) -> str:
    """The right-most entry of a comma list: the one the nearest (trusted) proxy added."""
    return (value or "").rpartition(",")[2].strip()


class Forwarded(NamedTuple):
    client: str
    scheme: str | None  # None: as the connection says
    host: str | None  # None: as the Host header says


def forwarded(peer: str, headers: CIMultiDictProxy[str], trusted: Networks) -> Forwarded | None:
    """What a trusted peer reports about its client; None for a peer outside `trusted` (nothing changes)."""
    if not in_networks(peer, trusted):
        return None
    client = client_address(peer, headers.getall("X-Forwarded-For", ()), trusted)
    scheme = _last(headers.get("X-Forwarded-Proto")).lower()
    host = _last(headers.get("X-Forwarded-Host"))
    # The host the client used: routing (sites' hosts) and any absolute URL use it.
    return Forwarded(client, scheme if scheme in _SCHEMES else None, host if _HOST.match(host) else None)


def forwarded_middleware(trusted: Networks) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        found = forwarded(request.remote or "", request.headers, trusted)
        if found is None:
            return await handler(request)
        # On the request aiohttp made: the access logger is handed that one, not the copy below.
        request[CLIENT] = found.client
        changes: dict[str, str] = {"remote": found.client}
        if found.scheme is not None:
            changes["scheme"] = found.scheme
        if found.host is not None:
            changes["host"] = found.host
        view = request.clone(**changes)  # type: ignore[arg-type]
        try:
            return await handler(view)
        finally:
            request.update(view)  # what the handler noted (site, bytes sent, S3 calls) is for the access log

    return middleware

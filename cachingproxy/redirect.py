"""`[server] redirect_http_port`: a plain-HTTP listener that answers every request with 308 to the same path
on HTTPS, relative to the Host the client used, and nothing else (no site, no cache, no admin)."""

from __future__ import annotations

import logging
import re

from aiohttp import web

from .accesslog import StructuredAccessLogger
from .config import Config

__all__ = ["https_location", "start_redirect_listener"]

log = logging.getLogger(__name__)

# A host name or an IP literal, with an optional port: nothing that could turn the Location into another URL.
_HOST = re.compile(r"(?P<name>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?\Z")


def https_location(host: str, raw_path: str, https_port: int) -> str | None:
    """Where a plain request goes: the same host on the HTTPS port, the same path and query; None when the
    Host or the target cannot be trusted into a URL."""
    match = _HOST.match(host)
    if match is None or not raw_path.startswith("/") or raw_path.startswith("//"):
        return None
    name = match.group("name")
    authority = name if https_port == 443 else f"{name}:{https_port}"
    return f"https://{authority}{raw_path}"


async def start_redirect_listener(config: Config) -> web.AppRunner | None:
    server = config.server
    if not server.redirect_http_port:
        return None
    https_port = server.port

    async def to_https(request: web.Request) -> web.StreamResponse:
        location = https_location(request.host, request.raw_path, https_port)
        if location is None:
            raise web.HTTPBadRequest(text="Bad Request\n")
        raise web.HTTPPermanentRedirect(location, text="")

    root = web.Application()
    root.router.add_route("*", "/{tail:.*}", to_https)
    runner = web.AppRunner(root, handle_signals=False, access_log_class=StructuredAccessLogger,
                           access_log_format=server.access_log)
    await runner.setup()
    try:
        # reuse_port: at a reload the new generation's leader binds while the draining one still listens.
        await web.TCPSite(runner, server.host, server.redirect_http_port, reuse_port=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("plain HTTP on %s:%d redirects to HTTPS (308)", server.host, server.redirect_http_port)
    return runner

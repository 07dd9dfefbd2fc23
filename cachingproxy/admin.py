"""The admin API: warm, purge, stats and the dashboard, behind `Authorization: Bearer <token>`.

It is a sub-app under `[admin] path` on the proxy's listener, or its own listener on `[admin] host:port`, and is
off (404) without a token. Every route except the dashboard page needs the token. The page itself holds no data
and fetches it from JS with that header, so a cross-site form post, or a page on a rebinding DNS name, cannot act
through an operator's browser (docs/reliability.md §4, admin exposure).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
from functools import cache
from importlib.resources import files
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .accesslog import StructuredAccessLogger, track_s3_calls
from .config import ADMIN_TOKEN_ENV, AdminConfig, Config
from .keys import MAX_KEY_BYTES
from .monitoring import NO_STORE, OPS, Ops, metrics
from .requestforms import request_forms
from .sites import Site
from .tls import admin_context
from .warm import KEEP_JOBS

__all__ = ["ADMIN_MAX_BODY", "mount_admin", "start_admin_listener"]

log = logging.getLogger(__name__)

ADMIN_MAX_BODY = 64 * 1024  # admin bodies are tiny JSON; aiohttp's default is 1 MiB (docs/reliability.md §4)
JSON_TYPE = "application/json"
DASHBOARD = "dashboard"  # route name: the one admin route that needs no token
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}



async def start_admin_listener(config: Config, ops: Ops, *, leader: bool) -> web.AppRunner | None:
    """Say where the admin API is; start its own listener when it has one (and this process leads)."""
    admin = config.admin
    if admin.public_metrics:
        log.info("/metrics is public on the proxy's port ([admin] public_metrics = true)")
    if not admin.token:
        log.info("admin API off, and with it %s/metrics: set %s (or [admin] token) to turn it on", admin.path,
                 ADMIN_TOKEN_ENV)
        return None
    # config.with_env_token: the variable, when set, is the token; say which, never what.
    source = ADMIN_TOKEN_ENV if os.environ.get(ADMIN_TOKEN_ENV) else "[admin] token in the config file"
    if admin.port and not leader:
        log.info("admin API on port %d is served by another worker", admin.port)
        return None
    if admin.port:
        root = web.Application(client_max_size=ADMIN_MAX_BODY, middlewares=[request_forms])
        root[OPS] = ops
        mount_admin(root, admin)
        runner = web.AppRunner(root, handle_signals=False, access_log_class=StructuredAccessLogger)
        await runner.setup()
        try:
            # reuse_port: at a reload the new generation's leader binds while the draining one still listens.
            await web.TCPSite(runner, admin.host, admin.port, ssl_context=admin_context(config),
                              reuse_port=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        log.info("admin API (with /metrics) on %s://%s:%d%s/; admin token from %s",
                 "https" if admin.tls_certificate else "http", admin.host, admin.port, admin.path, source)
        return runner
    log.info("admin API (with /metrics) on the proxy's port under %s/; admin token from %s", admin.path, source)
    if config.server.host not in LOOPBACK:
        log.warning("the admin API is reachable wherever the proxy is; consider [admin] port on 127.0.0.1")
    return None


# -- the admin API --------------------------------------------------------------------------------------------


def mount_admin(parent: web.Application, admin: AdminConfig) -> None:
    """The admin API under `admin.path` of `parent` (the proxy app, or the admin listener's own root)."""
    if admin.token:
        # Registered before the sub-app, which would answer 404 for its bare prefix.
        parent.router.add_get(admin.path, _to_dashboard)
    sub = web.Application(middlewares=[_guard(admin)])
    sub.router.add_get("/", _dashboard, name=DASHBOARD)
    sub.router.add_get("/stats", _stats)
    sub.router.add_get("/metrics", metrics)  # Prometheus: `authorization: {credentials: <token>}` in the job
    sub.router.add_get("/warm", _warm_list)
    sub.router.add_post("/warm", _warm_start)
    sub.router.add_get("/warm/{id}", _warm_status)
    sub.router.add_post("/purge", _purge)
    parent.add_subapp(admin.path, sub)


def _guard(admin: AdminConfig) -> Middleware:
    token = admin.token.encode()
    allowed = frozenset(host.lower() for host in admin.allowed_hosts)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not token:
            raise web.HTTPNotFound(text="Not Found\n")
        if allowed and _hostname(request.host) not in allowed:
            # DNS rebinding: a hostile page on a name that resolves here still sends its own name as Host.
            raise _json_error(web.HTTPForbidden, "this Host is not allowed for the admin API")
        if request.match_info.route.name != DASHBOARD and not _authorized(request, token):
            raise _json_error(web.HTTPUnauthorized, "unauthorized",
                              headers={"WWW-Authenticate": 'Bearer realm="cachingproxy-admin"'})
        track_s3_calls(request)
        return await handler(request)

    return guard


def _authorized(request: web.Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


_HOST = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<name>[^:]*))(?::\d*)?$")


def _hostname(host: str) -> str:
    """The name in a Host header, without port or trailing dot: "[::1]:8080" -> "::1"."""
    match = _HOST.match(host)
    if match is None:
        return ""
    return (match["v6"] or match["name"] or "").lower().rstrip(".")


def _json_error(cls: type[web.HTTPException], message: str, **kwargs: Any) -> web.HTTPException:
    return cls(text=json.dumps({"error": message}), content_type=JSON_TYPE, **kwargs)


async def _json_object(request: web.Request) -> dict[str, Any]:
    # Only JSON: an HTML form can post urlencoded or multipart cross-site, never application/json.
    if request.content_type != JSON_TYPE:
        raise _json_error(web.HTTPUnsupportedMediaType, "send application/json")
    # A sub-app's own client_max_size is ignored (the root app builds the request), so set it here.
    limited = request.clone(client_max_size=ADMIN_MAX_BODY)
    try:
        data = await limited.json()
    except ValueError:
        raise _json_error(web.HTTPBadRequest, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _json_error(web.HTTPBadRequest, "the body must be a JSON object")
    return data


def _key_sized(text: str) -> bool:
    """Within S3's key length limit, which counts UTF-8 bytes, not characters."""
    return len(text.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES


def _ops(request: web.Request) -> Ops:
    return request.config_dict[OPS]


async def _to_dashboard(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(location=request.path + "/")  # the page's relative fetches need the slash


@cache
def _page() -> tuple[bytes, str]:
    """The dashboard and a CSP that allows exactly its inline script and style, by hash (no 'unsafe-inline')."""
    page = files("cachingproxy").joinpath("dashboard.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        digests = (base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() for text in found)
        return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page.encode(), csp


async def _dashboard(request: web.Request) -> web.Response:
    body, csp = _page()
    return web.Response(body=body, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": csp, **PAGE_HEADERS})


async def _stats(request: web.Request) -> web.Response:
    ops = _ops(request)
    checks = await ops.s3_checks()  # first, so the snapshot counts the LISTs it may make
    figures = (await ops.snapshot()).as_json()
    # "ok", or what is wrong: "unreachable", "denied", "no such bucket" (s3state.S3State).
    states = [check.state.value for check in checks.values()]
    figures["s3"] = next((state for state in states if state != "ok"), "ok")
    for name, check in checks.items():
        figures["sites"][name]["s3"] = check.state.value
    return web.json_response(figures, headers=NO_STORE)


def _site(ops: Ops, body: dict[str, Any]) -> Site:
    """The site an admin call is for: `"site"` names it, and may be left out only when there is one."""
    name = body.pop("site", None)
    if name is None and len(ops.sites) == 1:
        return ops.sites.first
    if isinstance(name, str) and name in ops.sites.names:
        return ops.sites[name]
    names = ", ".join(ops.sites.names)
    problem = "unknown site" if name is not None else "say which site"
    raise _json_error(web.HTTPBadRequest, f'{problem}: send "site" as one of {names}')


async def _warm_start(request: web.Request) -> web.Response:
    ops = _ops(request)
    body = await _json_object(request)
    site = _site(ops, body)
    prefix = body.get("prefix", "")
    if set(body) - {"prefix"} or not isinstance(prefix, str) or not _key_sized(prefix) or prefix.startswith("/"):
        raise _json_error(web.HTTPBadRequest, 'send {"prefix": "guides/"}: a key prefix below the site\'s prefix')
    warmer = ops.warmers[site.name]
    job, created = warmer.start(prefix)
    await warmer.share(job)  # before the id is out: the client's next request may reach another worker
    return web.json_response({"id": job.id, "site": site.name, "prefix": prefix, "created": created}, status=202,
                             headers={"Location": f"{request.path}/{job.id}", **NO_STORE})


async def _warm_status(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    for warmer in _ops(request).warmers.values():
        job = await warmer.status(job_id)
        if job is not None:
            return web.json_response(job, headers=NO_STORE)
    raise _json_error(web.HTTPNotFound, "no such warm job (only the latest are kept)")


async def _warm_list(request: web.Request) -> web.Response:
    ops = _ops(request)
    merged: dict[str, dict[str, Any]] = {}
    for warmer in ops.warmers.values():  # the shared board has every worker's jobs; each warmer its own, fresher
        for job in await warmer.statuses():
            if job["id"] not in merged or job.get("site") == warmer.site:
                merged[job["id"]] = job
    site = request.query.get("site")
    jobs = sorted((job for job in merged.values() if site is None or job.get("site") == site),
                  key=lambda job: job["started"], reverse=True)[:KEEP_JOBS]
    return web.json_response({"jobs": jobs}, headers=NO_STORE)


async def _purge(request: web.Request) -> web.Response:
    ops = _ops(request)
    body = await _json_object(request)
    site = _site(ops, body)
    store, s3_prefix = site.store, site.config.s3.prefix
    await site.service.committed_under(s3_prefix)  # in this worker (filling.py: commits follow the response)
    match body:
        case {"key": str(key)} if len(body) == 1 and key and _key_sized(key):
            purged = await store.forget(s3_prefix + key)
        case {"prefix": str(prefix)} if len(body) == 1 and _key_sized(prefix):
            purged = await store.purge_prefix(s3_prefix + prefix)
        case {"all": bool(everything)} if everything and len(body) == 1:
            purged = await store.purge_prefix(s3_prefix)
        case _:
            raise _json_error(web.HTTPBadRequest, 'send one of {"key": "..."}, {"prefix": "..."} or {"all": true}')
    site.listings.clear()
    log.info("purge of site %s %s: %d entries removed", site.name, json.dumps(body), purged)
    return web.json_response({"purged": purged}, headers=NO_STORE)

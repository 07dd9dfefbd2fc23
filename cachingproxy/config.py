"""Typed configuration loaded from config.toml; every problem names the file, key and reason."""

from __future__ import annotations

import hashlib
import os
import re
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .access_rules import parse_networks

__all__ = [
    "ADMIN_TOKEN_ENV",
    "COMPRESSIBLE_TYPES",
    "AccessConfig",
    "AdminConfig",
    "CacheConfig",
    "CacheRule",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "EventsConfig",
    "S3Config",
    "ServerConfig",
    "SiteConfig",
    "load_config",
    "parse_config",
    "with_env_token",
]


ADMIN_TOKEN_ENV = "CACHINGPROXY_ADMIN_TOKEN"


class ConfigError(Exception):
    """A config file is missing or invalid; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    mount: str = "/docs"
    shutdown_timeout: float = 10.0
    keepalive_timeout: float = 15.0  # also the deadline for a request head (slowloris), see app.server_kwargs
    lingering_time: float = 2.0
    send_timeout: float = 60.0  # a response that makes no progress this long is cut (nginx send_timeout)
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    workers: int = 0  # processes on one port (SO_REUSEPORT); 0 = one per core, see workers.py
    access_log: str = "json"  # "json" (one object per line), "combined" (Apache/nginx) or "off"; accessline.py
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For/-Proto/-Host are believed (forwarded.py)
    tls_certificate: str = ""  # PEM certificate (and chain): the port speaks HTTPS only (tls.py); "" = plain HTTP
    tls_key: str = ""  # its PEM private key
    redirect_http_port: int = 0  # a plain listener answering 308 to https://; 0 = none
    fast_hits: bool = True  # fresh in-memory hits answered below aiohttp's web layer (fasthit.py)


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str = ""
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str = ""
    profile: str = ""  # a named profile from the AWS config files; "" = the standard credential chain
    addressing_style: str = "auto"
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    max_attempts: int = 3
    retry_mode: str = "standard"
    request_timeout: float = 30.0
    max_connections: int = 32
    breaker_threshold: int = 5
    breaker_cooldown: float = 10.0


@dataclass(frozen=True, slots=True)
class CacheRule:
    """One `[[cache.rules]]` entry; each setting comes from the first matching rule that sets it."""

    match: str
    ttl: float | None = None  # None: this rule leaves the TTL to a later rule or `[cache] ttl`
    client_cache_control: str | None = None  # Cache-Control toward browsers (freshness.py)
    override: bool = False  # client_cache_control replaces S3's own Cache-Control/Expires too


@dataclass(frozen=True, slots=True)
class CacheConfig:
    directory: str = "./cache"
    size_limit_mb: int = 1024
    ttl: float = 300.0
    index_document: str = "index.html"
    error_document: str = ""
    stale_if_error: float = 86400.0
    stale_while_revalidate: float = 0.0
    negative_ttl: float = 10.0
    verify_on_read: bool = False
    client_cache_control: str = "no-cache"  # sent when S3 gives no Cache-Control or Expires (freshness.py)
    rules: tuple[CacheRule, ...] = ()


@dataclass(frozen=True, slots=True)
class AdminConfig:
    path: str = "/_admin"
    token: str = ""
    host: str = "127.0.0.1"  # used only with `port`
    port: int = 0  # 0: the admin API shares the proxy's server, under `path`
    allowed_hosts: tuple[str, ...] = ()  # Host names the admin API answers to (DNS rebinding); () = any
    warm_concurrency: int = 8
    warm_prefixes: tuple[str, ...] = ()
    warm_interval: float = 0.0  # seconds between mirror warms of `warm_prefixes`; 0 = only at start
    readiness_ttl: float = 5.0
    public_metrics: bool = False  # also serve /metrics on the proxy's port, without the token
    tls_certificate: str = ""  # the admin listener's own certificate (with `port`); "" = plain, loopback only
    tls_key: str = ""


# Types worth compressing (encoding.py): text, scripts, data, vector images, wasm and uncompressed font formats.
# WOFF/WOFF2 are compressed already, so they are not here (nor any raster image, video or archive type).
COMPRESSIBLE_TYPES = ("text/*", "application/javascript", "application/x-javascript", "application/json",
                      "application/ld+json", "application/manifest+json", "application/xml", "application/rss+xml",
                      "application/atom+xml", "application/xhtml+xml", "image/svg+xml", "application/wasm",
                      "font/ttf", "font/otf", "application/vnd.ms-fontobject", "image/x-icon")


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """[compression]: br/zstd/gzip variants made once per object version (variants.py, encoding.py)."""

    enabled: bool = True
    types: tuple[str, ...] = COMPRESSIBLE_TYPES  # media types; "text/*" covers every text type
    min_size: int = 1024  # smaller bodies are sent as they are: a few bytes saved are not worth a Vary


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """S3 event notifications read from an SQS queue (events.py); an empty queue_url turns them off."""

    queue_url: str = ""
    region: str = ""  # "" = [s3] region
    endpoint_url: str = ""  # moto, ElasticMQ, LocalStack
    profile: str = ""  # "" = the standard credential chain
    wait_seconds: int = 20  # SQS long poll, 0-20
    refresh: bool = True  # after ObjectCreated for a cached key, fetch the new version at once
    fallback_ttl: float = 300.0  # while the queue cannot be read, the longest any entry goes unrevalidated
    sweep_interval: float = 0.0  # seconds between LIST sweeps of every cached prefix; 0 = only at start
    concurrency: int = 8  # refreshes in flight at once, so a 5,000-object publish never floods S3

    @property
    def enabled(self) -> bool:
        return bool(self.queue_url)


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """`[sites.access]`: who may read a site; both set means both are required (access.py)."""

    allow: tuple[str, ...] = ()  # CIDRs of client addresses allowed; () = everyone
    htpasswd: str = ""  # path of a bcrypt-only htpasswd file; "" = no password

    @property
    def protected(self) -> bool:
        return bool(self.allow or self.htpasswd)


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """One docs site: which requests it answers (hosts, mount) and where its objects come from."""

    name: str
    mount: str  # "" is the root, otherwise "/path" without a trailing slash
    s3: S3Config
    cache: CacheConfig  # directory and size_limit_mb are the global ones; the rest may differ per site
    hosts: tuple[str, ...] = ()  # lower-case names, "*.example" for one level of subdomain; () = any host
    listing: bool = False  # HTML listings for folders without an index document
    headers: tuple[tuple[str, str], ...] = ()  # added to every response of the site, replacing S3's
    warm_prefixes: tuple[str, ...] = ()  # mirror mode for this site
    access: AccessConfig = field(default_factory=AccessConfig)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    s3: S3Config = field(default_factory=S3Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    # Filled by parse_config: without [[sites]], one site named "default" made of [server] mount, [s3], [cache].
    sites: tuple[SiteConfig, ...] = ()
    # Which file version runs, for /stats and /metrics: set by load_config (reload.py reads it too).
    loaded_at: float = 0.0  # Unix time the file was read
    digest: str = ""  # the first 12 hex digits of the file's SHA-256


_ADDRESSING = ("auto", "path", "virtual")
_RETRY_MODES = ("standard", "adaptive", "legacy")
_ACCESS_LOGS = ("json", "combined", "off")  # accessline.FORMATS; config imports only access_rules of ours


def _values(cls: type[Any], raw: Any, where: str, src: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The keys a table sets, each checked against `cls`'s field of that name and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {where}: must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in skip:
            continue
        if name not in known:
            raise ConfigError(f"{src}: {where}.{name}: unknown key")
        want = type(getattr(cls(), name))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool) is not (want is bool):
            raise ConfigError(f"{src}: {where}.{name}: must be {want.__name__}, got {value!r}")
        values[name] = value
    return values


def _section(cls: type[Any], raw: Any, where: str, src: str, **extra: Any) -> Any:
    values = _values(cls, raw, where, src, frozenset(extra))
    values.update({k: v for k, v in extra.items() if v is not None})
    return cls(**values)


def _check(ok: bool, src: str, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{src}: {key}: {problem}")


def _strings(raw: Any, where: str, name: str, src: str) -> tuple[str, ...] | None:
    """A TOML array of strings as a tuple (the dataclasses are frozen); None when the key is absent."""
    if not isinstance(raw, dict) or name not in raw:
        return None
    value = raw[name]
    _check(isinstance(value, list | tuple) and all(isinstance(v, str) for v in value), src, f"{where}.{name}",
           f"must be an array of strings, got {value!r}")
    return tuple(value)


def _normalise_mount(mount: str, src: str) -> str:
    _check(mount.startswith("/"), src, "server.mount", "must start with '/'")
    _check("?" not in mount and "#" not in mount and "%" not in mount, src, "server.mount", "must be a plain path")
    return mount.rstrip("/")  # "" is the site root


_RULE_KEYS = frozenset({"match", "ttl", "client_cache_control", "override"})
# A header value we are about to send: visible ASCII and spaces only, so config can never inject a header line.
_HEADER_VALUE = re.compile(r"[\x20-\x7e]+")


def _rules(raw: Any, src: str, table: str = "cache.rules") -> tuple[CacheRule, ...]:
    _check(isinstance(raw, list), src, table, f"must be an array of tables ([[{table}]])")
    rules = []
    for i, item in enumerate(raw):
        where = f"{table}[{i}]"
        _check(isinstance(item, dict), src, where, "must be a table")
        _check(set(item) <= _RULE_KEYS, src, where, f"unknown keys {sorted(set(item) - _RULE_KEYS)}")
        match, ttl = item.get("match"), item.get("ttl")
        control, override = item.get("client_cache_control"), item.get("override", False)
        _check(isinstance(match, str) and bool(match), src, where + ".match", "must be a non-empty glob string")
        _check(ttl is None or (isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl >= 0), src,
               where + ".ttl", "must be a number >= 0")
        _check(control is None or _cache_control_ok(control), src, where + ".client_cache_control",
               "must be a non-empty Cache-Control value of printable ASCII")
        _check(isinstance(override, bool), src, where + ".override", "must be true or false")
        _check(ttl is not None or control is not None, src, where, "sets neither ttl nor client_cache_control")
        _check(not override or control is not None, src, where + ".override", "needs client_cache_control")
        rules.append(CacheRule(match=str(match), ttl=None if ttl is None else float(ttl),
                               client_cache_control=control, override=override))
    return tuple(rules)


def _cache_control_ok(value: Any) -> bool:
    return isinstance(value, str) and _HEADER_VALUE.fullmatch(value) is not None and bool(value.strip())


def parse_config(data: dict[str, Any], src: str = "config.toml") -> Config:
    """Build a Config from parsed TOML, checking every key; raise ConfigError naming the first problem."""
    unknown = set(data) - {"server", "s3", "cache", "admin", "sites", "events", "compression"}
    _check(not unknown, src, ", ".join(sorted(unknown)), "unknown section")
    server_raw = data.get("server", {})
    server = _section(ServerConfig, server_raw, "server", src,
                      trusted_proxies=_strings(server_raw, "server", "trusted_proxies", src))
    _check_networks(server.trusted_proxies, "server.trusted_proxies", src)
    server = ServerConfig(**{**{f.name: getattr(server, f.name) for f in fields(server)},
                             "mount": _normalise_mount(server.mount, src)})
    s3 = _section(S3Config, data.get("s3", {}), "s3", src)
    cache_raw = data.get("cache", {})
    rules = _rules(cache_raw.get("rules", []) if isinstance(cache_raw, dict) else [], src)
    cache = _section(CacheConfig, cache_raw, "cache", src, rules=rules)
    admin_raw = data.get("admin", {})
    admin = _section(AdminConfig, admin_raw, "admin", src,
                     **{name: _strings(admin_raw, "admin", name, src) for name in ("allowed_hosts", "warm_prefixes")})

    _check(0 < server.port < 65536, src, "server.port", "must be 1-65535")
    _check_tls(server.tls_certificate, server.tls_key, "server", src)
    _check_tls(admin.tls_certificate, admin.tls_key, "admin", src)
    _check(0 <= server.redirect_http_port < 65536 and server.redirect_http_port != server.port, src,
           "server.redirect_http_port", "must be 0-65535 and not server.port")
    _check(not server.redirect_http_port or bool(server.tls_certificate), src, "server.redirect_http_port",
           "needs server.tls_certificate (it redirects to HTTPS)")
    # Once the proxy speaks HTTPS, the admin token must not cross a network in the clear: off loopback, the
    # admin listener needs its own certificate.
    _check(not (server.tls_certificate and admin.port and admin.host not in _LOOPBACK and not admin.tls_certificate),
           src, "admin.host", "an admin listener off loopback needs admin.tls_certificate and admin.tls_key")
    _check(not admin.tls_certificate or bool(admin.port), src, "admin.tls_certificate",
           "needs admin.port (on the proxy's port the admin API uses server.tls_certificate)")
    _check(server.shutdown_timeout >= 0, src, "server.shutdown_timeout", "must be >= 0")
    _check(0 <= server.workers <= 256, src, "server.workers", "must be 0-256 (0 = one per core)")
    _check(server.keepalive_timeout > 0, src, "server.keepalive_timeout", "must be > 0")
    _check(server.lingering_time >= 0, src, "server.lingering_time", "must be >= 0")
    _check(server.send_timeout > 0, src, "server.send_timeout", "must be > 0")
    for key in ("max_line_size", "max_field_size", "max_headers"):
        _check(getattr(server, key) >= 1, src, f"server.{key}", "must be >= 1")
    _check(server.access_log in _ACCESS_LOGS, src, "server.access_log", f"must be one of {_ACCESS_LOGS}")
    _check(bool(cache.directory), src, "cache.directory", "is required")
    _check(cache.size_limit_mb >= 1, src, "cache.size_limit_mb", "must be >= 1")
    _check(admin.path.startswith("/") and len(admin.path) > 1, src, "admin.path", "must start with '/'")
    _check(not admin.path.endswith("/") and "?" not in admin.path and "%" not in admin.path, src, "admin.path",
           "must be a plain path without a trailing '/'")
    _check(0 <= admin.port < 65536, src, "admin.port", "must be 0-65535 (0 = on the proxy's own port)")
    _check(1 <= admin.warm_concurrency <= 256, src, "admin.warm_concurrency", "must be 1-256")
    _check(admin.warm_interval >= 0, src, "admin.warm_interval", "must be >= 0")
    _check(admin.readiness_ttl >= 0, src, "admin.readiness_ttl", "must be >= 0")
    _check(not any(p.startswith("/") for p in admin.warm_prefixes), src, "admin.warm_prefixes",
           "must be key prefixes below [s3] prefix, without a leading '/'")
    events = _section(EventsConfig, data.get("events", {}), "events", src)
    _check(0 <= events.wait_seconds <= 20, src, "events.wait_seconds", "must be 0-20 (the SQS long-poll limit)")
    _check(events.fallback_ttl >= 0, src, "events.fallback_ttl", "must be >= 0")
    _check(events.sweep_interval >= 0, src, "events.sweep_interval", "must be >= 0 (0 = only at start)")
    _check(1 <= events.concurrency <= 256, src, "events.concurrency", "must be 1-256")
    _check(events.queue_url == "" or events.queue_url.startswith(("http://", "https://")), src,
           "events.queue_url", "must be empty or the queue's https URL")
    _check(events.endpoint_url == "" or events.endpoint_url.startswith(("http://", "https://")), src,
           "events.endpoint_url", "must be empty or an http(s) URL")
    compression_raw = data.get("compression", {})
    compression = _section(CompressionConfig, compression_raw, "compression", src,
                           types=_strings(compression_raw, "compression", "types", src))
    _check(compression.min_size >= 0, src, "compression.min_size", "must be >= 0")
    _check(all(t.count("/") == 1 and t == t.strip().lower() and t.strip("/*") for t in compression.types), src,
           "compression.types", "must be lower-case media types such as \"text/css\" or \"text/*\"")
    if "sites" in data:
        sites = _sites(data["sites"], s3, cache, src)
    else:
        _check_s3(s3, "s3", src)
        _check_cache(cache, "cache", src)
        sites = (SiteConfig(name="default", mount=server.mount, s3=s3, cache=cache,
                            warm_prefixes=admin.warm_prefixes),)
    return Config(server=server, s3=s3, cache=cache, admin=admin, events=events, sites=sites,
                  compression=compression)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _check_tls(certificate: str, key: str, where: str, src: str) -> None:
    """Both or neither; the files themselves are read and matched by tls.py before anything starts."""
    _check(bool(certificate) == bool(key), src, f"{where}.tls_key" if certificate else f"{where}.tls_certificate",
           "tls_certificate and tls_key go together")


def _check_s3(s3: S3Config, where: str, src: str) -> None:
    _check(bool(s3.bucket), src, f"{where}.bucket", "is required")
    _check(not s3.prefix.startswith("/"), src, f"{where}.prefix", "must not start with '/' (S3 keys have none)")
    _check(s3.addressing_style in _ADDRESSING, src, f"{where}.addressing_style", f"must be one of {_ADDRESSING}")
    _check(s3.retry_mode in _RETRY_MODES, src, f"{where}.retry_mode", f"must be one of {_RETRY_MODES}")
    for key in ("connect_timeout", "read_timeout", "request_timeout"):
        _check(getattr(s3, key) > 0, src, f"{where}.{key}", "must be > 0")
    _check(1 <= s3.max_attempts <= 10, src, f"{where}.max_attempts", "must be 1-10")
    _check(s3.max_connections >= 1, src, f"{where}.max_connections", "must be >= 1")
    _check(s3.breaker_threshold >= 0, src, f"{where}.breaker_threshold", "must be >= 0 (0 = off)")
    _check(s3.breaker_cooldown > 0, src, f"{where}.breaker_cooldown", "must be > 0")
    _check(s3.endpoint_url == "" or s3.endpoint_url.startswith(("http://", "https://")), src,
           f"{where}.endpoint_url", "must be empty or an http(s) URL")


def _check_cache(cache: CacheConfig, where: str, src: str) -> None:
    for key in ("ttl", "stale_if_error", "stale_while_revalidate", "negative_ttl"):
        _check(getattr(cache, key) >= 0, src, f"{where}.{key}", "must be >= 0")
    _check(_cache_control_ok(cache.client_cache_control), src, f"{where}.client_cache_control",
           "must be a non-empty Cache-Control value of printable ASCII")
    _check(bool(cache.index_document) and "/" not in cache.index_document, src, f"{where}.index_document",
           "must be a file name without '/'")


_SITE_KEYS = frozenset({"name", "hosts", "mount", "listing", "s3", "cache", "headers", "warm_prefixes", "access"})
_GLOBAL_CACHE_KEYS = frozenset({"directory", "size_limit_mb"})
_SITE_NAME = re.compile(r"[a-z0-9_-]+\Z")
_HOST = re.compile(r"(?:\*\.)?[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 §5.6.2 token


def _sites(raw: Any, s3: S3Config, cache: CacheConfig, src: str) -> tuple[SiteConfig, ...]:
    """[[sites]]: each site's s3 and cache tables override the top-level ones for that site only.

    Every problem is collected, so an operator fixes them in one go: one line each.
    """
    _check(isinstance(raw, list) and bool(raw), src, "sites", "must be a non-empty array of tables ([[sites]])")
    problems: list[str] = []
    sites: list[SiteConfig] = []
    for i, item in enumerate(raw):
        try:
            sites.append(_site(item, f"sites[{i}]", s3, cache, src))
        except ConfigError as exc:
            problems.append(str(exc))
    names = [site.name for site in sites]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{src}: sites: two sites are named {name!r}")
    claimed: dict[tuple[str, str], str] = {}
    for site in sites:
        for host in site.hosts or ("",):
            other = claimed.setdefault((host, site.mount), site.name)
            if other != site.name:
                problems.append(f"{src}: sites: {other!r} and {site.name!r} both claim host "
                                f"{host or '(any)'!r} and mount {site.mount or '/'!r}")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return tuple(sites)


def _site(raw: Any, where: str, s3: S3Config, cache: CacheConfig, src: str) -> SiteConfig:
    _check(isinstance(raw, dict), src, where, "must be a table")
    unknown = set(raw) - _SITE_KEYS
    _check(not unknown, src, f"{where}.{min(unknown) if unknown else ''}", "unknown key")
    name = raw.get("name")
    _check(isinstance(name, str) and bool(_SITE_NAME.match(name)), src, f"{where}.name",
           "is required: lower-case letters, digits, '-' and '_'")
    assert isinstance(name, str)
    where = f"sites.{name}"
    mount = raw.get("mount", "/")
    _check(isinstance(mount, str) and mount.startswith("/"), src, f"{where}.mount", "must start with '/'")
    _check("?" not in mount and "#" not in mount and "%" not in mount, src, f"{where}.mount", "must be a plain path")
    hosts = _strings(raw, where, "hosts", src) or ()
    hosts = tuple(host.lower().rstrip(".") for host in hosts)
    for host in hosts:
        _check(bool(_HOST.match(host)), src, f"{where}.hosts", f"{host!r} is not a host name or '*.name'")
    listing = raw.get("listing", False)
    _check(isinstance(listing, bool), src, f"{where}.listing", "must be true or false")
    s3_raw = raw.get("s3", {})
    _check(isinstance(s3_raw, dict), src, f"{where}.s3", "must be a table")
    site_s3 = replace(s3, **_values(S3Config, s3_raw, f"{where}.s3", src))
    cache_raw = raw.get("cache", {})
    _check(isinstance(cache_raw, dict), src, f"{where}.cache", "must be a table")
    global_keys = _GLOBAL_CACHE_KEYS & set(cache_raw)
    _check(not global_keys, src, f"{where}.cache.{min(global_keys) if global_keys else ''}",
           "is global: set it in [cache]")
    overrides = _values(CacheConfig, cache_raw, f"{where}.cache", src, frozenset({"rules"}))
    if "rules" in cache_raw:
        overrides["rules"] = _rules(cache_raw["rules"], src, f"{where}.cache.rules")
    site_cache = replace(cache, **overrides)
    headers_raw = raw.get("headers", {})
    _check(isinstance(headers_raw, dict), src, f"{where}.headers", "must be a table of header names and values")
    headers = []
    for header, value in headers_raw.items():
        _check(bool(_HEADER_NAME.match(header)), src, f"{where}.headers.{header}", "is not a header name")
        _check(isinstance(value, str) and not any(c in value for c in "\r\n\0"), src, f"{where}.headers.{header}",
               "must be a one-line string")
        headers.append((header, value))
    warm_prefixes = _strings(raw, where, "warm_prefixes", src) or ()
    _check(not any(p.startswith("/") for p in warm_prefixes), src, f"{where}.warm_prefixes",
           "must be key prefixes below the site's prefix, without a leading '/'")
    _check_s3(site_s3, f"{where}.s3", src)
    _check_cache(site_cache, f"{where}.cache", src)
    return SiteConfig(name=name, mount=mount.rstrip("/"), s3=site_s3, cache=site_cache, hosts=hosts,
                      listing=listing, headers=tuple(headers), warm_prefixes=warm_prefixes,
                      access=_access(raw.get("access", {}), f"{where}.access", src))


def _access(raw: Any, where: str, src: str) -> AccessConfig:
    """[sites.access]; the htpasswd file itself is read and checked by access.py (config reads no other file)."""
    allow = _strings(raw, where, "allow", src) or ()
    access = _section(AccessConfig, raw, where, src, allow=allow)
    _check_networks(allow, f"{where}.allow", src)
    return AccessConfig(allow=allow, htpasswd=access.htpasswd)


def _check_networks(values: tuple[str, ...], key: str, src: str) -> None:
    try:
        parse_networks(values)
    except ValueError as exc:
        raise ConfigError(f"{src}: {key}: {exc}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    src = str(path)
    try:
        raw = Path(path).read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{src}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read: {exc.__class__.__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: invalid TOML: {exc}") from None
    config = replace(parse_config(data, src), loaded_at=time.time(), digest=hashlib.sha256(raw).hexdigest()[:12])
    return with_env_token(config, os.environ)


def with_env_token(config: Config, environ: Mapping[str, str]) -> Config:
    """`CACHINGPROXY_ADMIN_TOKEN` wins over `[admin] token`, so the secret need not live in a file."""
    token = environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        return config
    return replace(config, admin=replace(config.admin, token=token))

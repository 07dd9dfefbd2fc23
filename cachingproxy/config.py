"""Typed configuration loaded from config.toml; every problem names the file, key and reason."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ADMIN_TOKEN_ENV",
    "AdminConfig",
    "CacheConfig",
    "CacheRule",
    "Config",
    "ConfigError",
    "S3Config",
    "ServerConfig",
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


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str = ""
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str = ""
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
    match: str
    ttl: float


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


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    s3: S3Config = field(default_factory=S3Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)


_ADDRESSING = ("auto", "path", "virtual")
_RETRY_MODES = ("standard", "adaptive", "legacy")


def _section(cls: type[Any], raw: Any, where: str, src: str, **extra: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {where}: must be a table")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name in extra:
            continue
        if name not in known:
            raise ConfigError(f"{src}: {where}.{name}: unknown key")
        want = type(getattr(cls(), name))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool) is not (want is bool):
            raise ConfigError(f"{src}: {where}.{name}: must be {want.__name__}, got {value!r}")
        values[name] = value
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


def _rules(raw: Any, src: str) -> tuple[CacheRule, ...]:
    _check(isinstance(raw, list), src, "cache.rules", "must be an array of tables ([[cache.rules]])")
    rules = []
    for i, item in enumerate(raw):
        where = f"cache.rules[{i}]"
        _check(isinstance(item, dict), src, where, "must be a table")
        _check(set(item) <= {"match", "ttl"}, src, where, f"unknown keys {sorted(set(item) - {'match', 'ttl'})}")
        match, ttl = item.get("match"), item.get("ttl")
        _check(isinstance(match, str) and bool(match), src, where + ".match", "must be a non-empty glob string")
        _check(isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl >= 0, src, where + ".ttl",
               "must be a number >= 0")
        rules.append(CacheRule(match=str(match), ttl=float(ttl)))
    return tuple(rules)


def parse_config(data: dict[str, Any], src: str = "config.toml") -> Config:
    """Build a Config from parsed TOML, checking every key; raise ConfigError naming the first problem."""
    unknown = set(data) - {"server", "s3", "cache", "admin"}
    _check(not unknown, src, ", ".join(sorted(unknown)), "unknown section")
    server = _section(ServerConfig, data.get("server", {}), "server", src)
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
    _check(server.shutdown_timeout >= 0, src, "server.shutdown_timeout", "must be >= 0")
    _check(0 <= server.workers <= 256, src, "server.workers", "must be 0-256 (0 = one per core)")
    _check(server.keepalive_timeout > 0, src, "server.keepalive_timeout", "must be > 0")
    _check(server.lingering_time >= 0, src, "server.lingering_time", "must be >= 0")
    _check(server.send_timeout > 0, src, "server.send_timeout", "must be > 0")
    for key in ("max_line_size", "max_field_size", "max_headers"):
        _check(getattr(server, key) >= 1, src, f"server.{key}", "must be >= 1")
    _check(bool(s3.bucket), src, "s3.bucket", "is required")
    _check(not s3.prefix.startswith("/"), src, "s3.prefix", "must not start with '/' (S3 keys have none)")
    _check(s3.addressing_style in _ADDRESSING, src, "s3.addressing_style", f"must be one of {_ADDRESSING}")
    _check(s3.retry_mode in _RETRY_MODES, src, "s3.retry_mode", f"must be one of {_RETRY_MODES}")
    for key in ("connect_timeout", "read_timeout", "request_timeout"):
        _check(getattr(s3, key) > 0, src, f"s3.{key}", "must be > 0")
    _check(1 <= s3.max_attempts <= 10, src, "s3.max_attempts", "must be 1-10")
    _check(s3.max_connections >= 1, src, "s3.max_connections", "must be >= 1")
    _check(s3.breaker_threshold >= 0, src, "s3.breaker_threshold", "must be >= 0 (0 = off)")
    _check(s3.breaker_cooldown > 0, src, "s3.breaker_cooldown", "must be > 0")
    _check(s3.endpoint_url == "" or s3.endpoint_url.startswith(("http://", "https://")), src,
           "s3.endpoint_url", "must be empty or an http(s) URL")
    _check(bool(cache.directory), src, "cache.directory", "is required")
    _check(cache.size_limit_mb >= 1, src, "cache.size_limit_mb", "must be >= 1")
    for key in ("ttl", "stale_if_error", "stale_while_revalidate", "negative_ttl"):
        _check(getattr(cache, key) >= 0, src, f"cache.{key}", "must be >= 0")
    _check(bool(cache.index_document) and "/" not in cache.index_document, src, "cache.index_document",
           "must be a file name without '/'")
    _check(admin.path.startswith("/") and len(admin.path) > 1, src, "admin.path", "must start with '/'")
    _check(not admin.path.endswith("/") and "?" not in admin.path and "%" not in admin.path, src, "admin.path",
           "must be a plain path without a trailing '/'")
    _check(0 <= admin.port < 65536, src, "admin.port", "must be 0-65535 (0 = on the proxy's own port)")
    _check(1 <= admin.warm_concurrency <= 256, src, "admin.warm_concurrency", "must be 1-256")
    _check(admin.warm_interval >= 0, src, "admin.warm_interval", "must be >= 0")
    _check(admin.readiness_ttl >= 0, src, "admin.readiness_ttl", "must be >= 0")
    _check(not any(p.startswith("/") for p in admin.warm_prefixes), src, "admin.warm_prefixes",
           "must be key prefixes below [s3] prefix, without a leading '/'")
    return Config(server=server, s3=s3, cache=cache, admin=admin)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    src = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{src}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read: {exc.__class__.__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: invalid TOML: {exc}") from None
    return with_env_token(parse_config(data, src), os.environ)


def with_env_token(config: Config, environ: Mapping[str, str]) -> Config:
    """`CACHINGPROXY_ADMIN_TOKEN` wins over `[admin] token`, so the secret need not live in a file."""
    token = environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        return config
    return replace(config, admin=replace(config.admin, token=token))

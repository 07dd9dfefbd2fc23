"""What a reload (SIGHUP to the main process) would switch to: the configuration file read again and checked as
completely as `serve` checks it before starting, with the settings that need a restart kept as they are.

nginx's model: the main process re-reads and validates; only a configuration that passed goes to the workers
(supervisor.py starts a new generation of them on it and retires the old one gracefully). Nothing here starts
anything, so a bad file changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .config import AdminConfig, CacheConfig, Config, ConfigError, ServerConfig, load_config
from .profiles import profile_problems

__all__ = ["RESTART_ONLY", "Reloaded", "load_for_reload", "preflight"]

# (section, key): listen addresses and the worker count belong to sockets and processes the supervisor holds;
# the cache directory and its size to the store every generation shares while one drains and one starts.
RESTART_ONLY = (("server", "host"), ("server", "port"), ("server", "workers"), ("server", "redirect_http_port"),
                ("admin", "host"), ("admin", "port"), ("cache", "directory"), ("cache", "size_limit_mb"))


@dataclass(frozen=True, slots=True)
class Reloaded:
    config: Config  # the new configuration with the restart-only settings of the running one
    digest: str  # short hash of the file's bytes, as /stats and /metrics show it
    kept: tuple[str, ...]  # restart-only settings the file changed, each "server.port: 8080 (file says 9090)"


def preflight(config: Config, src: str) -> list[str]:
    """What `serve` checks beyond the file's own keys before it starts anything: AWS profiles, htpasswd files,
    certificates. One line per problem.

    access.py (bcrypt) and tls.py are imported only when the config uses them: this runs in the supervisor,
    whose memory the README's Performance section counts.
    """
    problems = [f"{src}: {p}" for p in profile_problems([site.s3 for site in config.sites])]
    problems += [f"{src}: {p}" for p in profile_problems([config.events], key="events.profile")]
    if any(site.access.protected for site in config.sites):
        from .access import load_all

        problems += load_all(config)
    if config.server.tls_certificate or config.admin.tls_certificate:
        from .tls import check_tls

        problems += check_tls(config)
    return problems


def load_for_reload(path: str, running: Config) -> Reloaded | list[str]:
    """The configuration to switch to, or every problem (one line each) and nothing switches."""
    try:
        fresh = load_config(path)
    except ConfigError as exc:
        return str(exc).splitlines()
    problems = preflight(fresh, path)
    if problems:
        return problems
    kept = []
    sections: dict[str, Any] = {"server": fresh.server, "admin": fresh.admin, "cache": fresh.cache}
    for section, key in RESTART_ONLY:
        now, wanted = getattr(getattr(running, section), key), getattr(sections[section], key)
        if now != wanted:
            kept.append(f"{section}.{key}: {now!r} (the file says {wanted!r})")
            sections[section] = replace(sections[section], **{key: now})
    server: ServerConfig = sections["server"]
    admin: AdminConfig = sections["admin"]
    cache: CacheConfig = sections["cache"]
    sites = tuple(replace(site, cache=replace(site.cache, directory=cache.directory,
                                              size_limit_mb=cache.size_limit_mb)) for site in fresh.sites)
    config = replace(fresh, server=server, admin=admin, cache=cache, sites=sites)
    return Reloaded(config, config.digest, tuple(kept))

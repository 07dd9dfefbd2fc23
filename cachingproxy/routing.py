"""Pure: which site answers a request, from its Host header and path.

An exact host beats a wildcard (`*.docs.corp`, one level), which beats a site that names no hosts; within
the first group that has a site for the path, the longest mount wins, on segment boundaries (`/api` never
matches `/apiary`). A dictionary lookup and a scan of the few sites sharing a host: no loop over every site.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .config import SiteConfig

__all__ = ["Router", "hostname", "mount_matches"]

_HOST = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<name>[^:]*))(?::\d*)?$")


@functools.lru_cache(maxsize=1024)  # a handful of names in practice; bounded against clients that vary it
def hostname(host: str) -> str:
    """The name in a Host header, without port or trailing dot, lower-case: "Docs.Corp.:8080" -> "docs.corp"."""
    match = _HOST.match(host)
    if match is None:
        return ""
    return (match["v6"] or match["name"] or "").lower().rstrip(".")


def mount_matches(mount: str, path: str) -> bool:
    """Whether `path` (raw, from the request line) lies under `mount` ("" is the root)."""
    return path.startswith(mount) and (len(path) == len(mount) or path[len(mount)] in "/?")


@dataclass(frozen=True, slots=True)
class Router:
    exact: dict[str, tuple[SiteConfig, ...]]
    wildcard: dict[str, tuple[SiteConfig, ...]]  # "docs.corp" for a site with host "*.docs.corp"
    any_host: tuple[SiteConfig, ...]

    @classmethod
    def build(cls, sites: Iterable[SiteConfig]) -> Router:
        exact: dict[str, list[SiteConfig]] = {}
        wildcard: dict[str, list[SiteConfig]] = {}
        any_host: list[SiteConfig] = []
        for site in sites:
            for host in site.hosts:
                if host.startswith("*."):
                    wildcard.setdefault(host[2:], []).append(site)
                else:
                    exact.setdefault(host, []).append(site)
            if not site.hosts:
                any_host.append(site)

        def longest_first(group: list[SiteConfig]) -> tuple[SiteConfig, ...]:
            return tuple(sorted(group, key=lambda site: len(site.mount), reverse=True))

        return cls({h: longest_first(g) for h, g in exact.items()},
                   {h: longest_first(g) for h, g in wildcard.items()}, longest_first(any_host))

    def route(self, host: str, path: str) -> SiteConfig | None:
        name = hostname(host)
        parent = name.partition(".")[2]
        for group in (self.exact.get(name), self.wildcard.get(parent) if parent else None, self.any_host):
            for site in group or ():
                if mount_matches(site.mount, path):
                    return site
        return None

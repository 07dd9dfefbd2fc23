"""The sites a proxy serves, as running objects: each site's settings, service, S3 origin and warmer, and the
router that picks one per request. Built once by the app (app.py `_sites_ctx`); nothing here does I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .access import SiteAccess
from .config import SiteConfig
from .namespace import NamespacedStore
from .origin import S3Origin
from .routing import Router
from .service import CachingProxy
from .variants import Variants

__all__ = ["Listing", "Site", "Sites"]


@dataclass(frozen=True, slots=True)
class Listing:
    """A folder listing page as rendered, and when S3 was asked for it."""

    body: bytes
    made_at: float


@dataclass(slots=True)
class Site:
    config: SiteConfig
    service: CachingProxy
    origin: S3Origin
    store: NamespacedStore
    variants: Variants  # compressed variants of this site's objects (variants.py)
    # Folder listings (`listing = true`), per S3 prefix; kept for the site's TTL, bounded in number.
    listings: dict[str, Listing] = field(default_factory=dict)
    access: SiteAccess | None = None  # None: an open site ([sites.access] unset)

    @property
    def name(self) -> str:
        return self.config.name


class Sites:
    """name -> Site, and route(host, path) -> Site."""

    def __init__(self, sites: dict[str, Site]) -> None:
        self._sites = sites
        self._by_config = {id(site.config): site for site in sites.values()}
        self._router = Router.build(site.config for site in sites.values())

    def route(self, host: str, path: str) -> Site | None:
        config = self._router.route(host, path)
        return None if config is None else self._by_config[id(config)]

    def __getitem__(self, name: str) -> Site:
        return self._sites[name]

    def __iter__(self) -> Iterator[Site]:
        return iter(self._sites.values())

    def __len__(self) -> int:
        return len(self._sites)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._sites)

    @property
    def first(self) -> Site:
        """The only site of a config without [[sites]] ("default")."""
        return next(iter(self._sites.values()))

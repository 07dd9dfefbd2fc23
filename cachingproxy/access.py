"""Per-site access control, failing closed: the allow list and the htpasswd file of `[sites.access]`.

Reading the password file and running bcrypt happen here; parsing and matching are access_rules.py's. bcrypt
costs about 50-250 ms of CPU by design, so it runs off the event loop, at most VERIFY_THREADS at a time per
worker, and a verified Authorization value is remembered for VERIFIED_TTL seconds under a hash of it: a page
with 40 assets pays for one check, not 40. Failures are never remembered, so a changed password or a removed
user takes effect within VERIFIED_TTL, and guessing still costs a bcrypt each time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from .access_rules import Networks, Users, basic_credentials, credentials_digest, in_networks, parse_htpasswd
from .access_rules import parse_networks as _parse_networks
from .config import Config, ConfigError, SiteConfig

__all__ = ["VERIFIED_KEPT", "VERIFIED_TTL", "Refusal", "SiteAccess", "load_access", "load_all"]

VERIFIED_TTL = 60.0  # seconds a verified Authorization value is believed without running bcrypt again
VERIFIED_KEPT = 4096  # verified values remembered per site and worker; the oldest go first
VERIFY_THREADS = 2  # bcrypt checks at once per worker: guesses cannot take every core


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not see the site: 403 (address) or 401 (credentials, with the realm to ask for)."""

    status: int
    realm: str = ""


class SiteAccess:
    """One site's rules: allow (CIDRs; () = everyone) and users (None = no password)."""

    def __init__(self, site: str, allow: Networks, users: Users | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.site = site
        self.allow = allow
        self.users = users
        self._clock = clock
        self._verified: dict[bytes, float] = {}
        self._threads = asyncio.Semaphore(VERIFY_THREADS)

    async def refusal(self, client: str, authorization: str | None) -> Refusal | None:
        """None when the request may go on; the address is checked first, so 403 never asks for a password."""
        if self.allow and not in_networks(client, self.allow):
            return Refusal(403)
        if self.users is None:
            return None
        if authorization and await self._verify(authorization):
            return None
        return Refusal(401, self.site)

    async def _verify(self, authorization: str) -> bool:
        digest = credentials_digest(self.site, authorization)
        now = self._clock()
        expires = self._verified.get(digest)
        if expires is not None and now < expires:
            return True
        credentials = basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self.users.get(user) if self.users is not None else None
        if hashed is None:
            return False
        async with self._threads:
            ok = await asyncio.to_thread(_checkpw, password, hashed)
        if ok:
            self._verified.pop(digest, None)
            self._verified[digest] = self._clock() + VERIFIED_TTL
            while len(self._verified) > VERIFIED_KEPT:
                self._verified.pop(next(iter(self._verified)))
        return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt >= 5 refuses passwords over 72 bytes, which no stored hash can match anyway
        return False


def load_access(site: SiteConfig) -> SiteAccess | None:
    """The site's rules with its htpasswd file read and checked; None for an open site. ConfigError lists
    every problem (an unreadable file, each refused line), so a bad file refuses to start."""
    access = site.access
    if not access.allow and not access.htpasswd:
        return None
    try:
        allow = _parse_networks(access.allow)
    except ValueError as exc:  # config.py checked them already; kept for callers that build a SiteConfig
        raise ConfigError(f"sites.{site.name}.access.allow: {exc}") from None
    users: Users | None = None
    if access.htpasswd:
        try:
            text = Path(access.htpasswd).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{access.htpasswd}: file not found (sites.{site.name}.access.htpasswd)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{access.htpasswd}: cannot read: {exc.__class__.__name__} "
                              f"(sites.{site.name}.access.htpasswd)") from None
        parsed, problems = parse_htpasswd(text)
        if problems:
            raise ConfigError("\n".join(f"{access.htpasswd}: line {p.line}: {p.problem}" for p in problems))
        if not parsed:
            raise ConfigError(f"{access.htpasswd}: no users: nobody could read site {site.name!r}")
        users = parsed
    return SiteAccess(site.name, allow, users)


def load_all(config: Config) -> list[str]:
    """Every site's access files checked; the problems, one line each (empty: all good)."""
    problems: list[str] = []
    for site in config.sites:
        try:
            load_access(site)
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
    return problems

"""Access control and client addresses, pure: CIDR lists, trusted-proxy X-Forwarded-For, htpasswd lines, Basic
credentials and the Cache-Control a protected site sends. Values in, values out; access.py does the I/O."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Network",
    "Networks",
    "Users",
    "basic_credentials",
    "client_address",
    "credentials_digest",
    "in_networks",
    "parse_htpasswd",
    "parse_networks",
    "private_cache_control",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = tuple[Network, ...]
Users = Mapping[str, bytes]  # user name -> bcrypt hash

# bcrypt as Apache's htpasswd -B writes it ($2y$) and as the bcrypt library and OpenBSD do ($2b$, $2a$):
# cost two digits, then 22 salt and 31 hash characters of bcrypt's base64 alphabet.
_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")
_FORMAT_NAMES = (("$apr1$", "MD5 ($apr1$)"), ("{SHA}", "SHA1 ({SHA})"), ("$1$", "MD5-crypt ($1$)"),
                 ("$5$", "SHA256-crypt ($5$)"), ("$6$", "SHA512-crypt ($6$)"))


def parse_networks(values: Iterable[str]) -> Networks:
    """CIDRs ("10.0.0.0/8", "fd00::/8") or single addresses; ValueError names the first bad one.

    strict=False would silently widen "10.1.2.3/8" to all of 10/8: a typo must not open a site, so host bits
    set are refused (fail closed).
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError:
            raise ValueError(f"{value!r} is not an address or CIDR network (host bits must be zero)") from None
    return tuple(networks)


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d; the lists are written in IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: str, networks: Networks) -> bool:
    """Whether `address` is in any of `networks`; an unparsable address is in none (fail closed)."""
    parsed = _address(address)
    return parsed is not None and any(parsed in network for network in networks)


def client_address(peer: str, forwarded_for: Iterable[str], trusted: Networks) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the right-most
    X-Forwarded-For entry that is not itself trusted (each trusted hop vouches for the one left of it).

    Left of the first untrusted entry anything may be forged, so it is never read. An entry that is not an
    address ends the walk at the trusted hop that wrote it.
    """
    if not trusted or not in_networks(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        parsed = _address(hop)
        if parsed is None:
            return client
        client = str(parsed)
        if not any(parsed in network for network in trusted):
            return client
    return client  # every hop trusted: the left-most is the best we know


@dataclass(frozen=True, slots=True)
class HtpasswdError:
    """One refused line of an htpasswd file."""

    line: int
    problem: str


def parse_htpasswd(text: str) -> tuple[dict[str, bytes], list[HtpasswdError]]:
    """`user:$2y$...` lines (blank lines and # comments skipped) and the problems, one per refused line.

    Only bcrypt: MD5 ($apr1$), SHA1 ({SHA}), crypt(3) and plain text are fast to brute-force from a stolen
    file, and accepting them would quietly keep them in use.
    """
    users: dict[str, bytes] = {}
    problems: list[HtpasswdError] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            problems.append(HtpasswdError(number, "is not user:hash"))
        elif not _BCRYPT.match(hashed):
            name = next((name for prefix, name in _FORMAT_NAMES if hashed.startswith(prefix)), "not bcrypt")
            problems.append(HtpasswdError(number, f"{name}: only bcrypt ($2y$/$2b$) is accepted; "
                                                  "re-create it with `htpasswd -B`"))
        elif user in users:
            problems.append(HtpasswdError(number, f"user {user!r} appears twice"))
        else:
            users[user] = hashed.encode("ascii")
    return users, problems


def basic_credentials(authorization: str | None) -> tuple[str, bytes] | None:
    """RFC 7617 Basic credentials as (user, password bytes); None for anything else or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def credentials_digest(site: str, authorization: str) -> bytes:
    """The key under which a verified Authorization value is remembered: a hash, so no password sits in
    memory in the clear longer than the check, and per site, so one site's users never pass another's."""
    return hashlib.sha256(f"{site}\0{authorization}".encode("utf-8", "surrogateescape")).digest()


_SHARED_ONLY = frozenset({"public", "s-maxage", "proxy-revalidate"})


def private_cache_control(value: str | None) -> str:
    """`Cache-Control` for a protected site's response: S3's directives plus `private` (RFC 9111 §5.2.2.7), so
    no shared cache between proxy and reader keeps it; `public` and shared-cache directives are dropped."""
    if not value:
        return "private"
    kept = []
    for directive in value.split(","):
        name = directive.strip().partition("=")[0].strip().lower()
        if name and name not in _SHARED_ONLY and name != "private":
            kept.append(directive.strip())
    return ", ".join(["private", *kept])

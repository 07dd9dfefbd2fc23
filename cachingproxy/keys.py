"""Pure mapping from a raw request path to an S3 key, a redirect target, or a refusal."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = ["MAX_KEY_BYTES", "BadTarget", "Key", "OriginForm", "Redirect", "Reject", "index_key", "redirect_location",
           "request_key", "request_target"]

MAX_KEY_BYTES = 1024  # S3's own key length limit
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters left unescaped in a Location we build: the RFC 3986 path set minus "%" (we re-encode).
_LOCATION_SAFE = "/!$&'()*+,;=:@-._~"
# The query is passed on still encoded, so "%" stays; anything else outside RFC 3986's query set (a raw
# control character or non-ASCII byte that a lenient parser let through) is percent-encoded.
_QUERY_SAFE = _LOCATION_SAFE + "?%"


@dataclass(frozen=True, slots=True)
class Key:
    """An S3 key inside the configured prefix, and what the client asked for relative to the mount."""

    s3_key: str
    relative: str  # decoded path below the mount, "" for the mount itself
    query: str
    directory: bool  # the index document was appended (path ended in "/" or was the mount)


@dataclass(frozen=True, slots=True)
class Reject:
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Redirect:
    """The bare mount: `/docs` -> `/docs/`, or `_static/site.css` in its index page resolves off the mount;
    and an encoded slash to its canonical spelling."""

    location: str


@dataclass(frozen=True, slots=True)
class OriginForm:
    """A request-target as the router and `request_key` expect it: a path with its query."""

    target: str  # starts with "/"
    authority: str | None  # from an absolute-form target: replaces Host (RFC 9112 §3.2.2)


@dataclass(frozen=True, slots=True)
class BadTarget:
    status: int  # 400 or 405
    reason: str


# RFC 9112 §3.2.2 absolute-form for the schemes we serve; the scheme is case-insensitive (RFC 3986 §3.1).
_ABSOLUTE = re.compile(r"(?i:https?)://([^/?#]*)(.*)", re.DOTALL)
# host [":" port]: a reg-name, an IPv4 address or an IP literal in brackets. No userinfo: RFC 9110 §4.2.4 says to
# treat it as an error (it carries credentials, and "http://trusted@evil/" is a classic confusion).
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+|\[[0-9A-Fa-f:.]+\](?::[0-9]*)?|"
                        r"(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+:[0-9]*")


def request_target(method: str, target: str) -> OriginForm | BadTarget:
    """Sort a request-target into the four forms of RFC 9112 §3.2; only origin-form reaches the router's logic.

    An absolute-form target is served like its origin-form path, its authority standing in for Host (§3.2.2:
    a server MUST accept it). CONNECT's authority-form asks for a tunnel, which a cache for one bucket never
    opens (405); the asterisk-form is defined for OPTIONS only (§3.2.4), which we do not implement (405),
    and is invalid with any other method (400).
    """
    if method == "CONNECT":
        return BadTarget(405, "CONNECT is not supported")
    if target.startswith("/"):
        return OriginForm(target, None)
    if target == "*":
        return BadTarget(405, "OPTIONS is not supported") if method == "OPTIONS" else \
            BadTarget(400, "the asterisk-form is for OPTIONS only")
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        return BadTarget(400, "invalid request-target")
    authority, rest = match[1], match[2]
    if _AUTHORITY.fullmatch(authority) is None:
        return BadTarget(400, "invalid authority in request-target")
    # "http://host" and "http://host?q" name the root (RFC 9110 §4.2.3: an empty path is "/").
    return OriginForm(rest if rest.startswith("/") else "/" + rest, authority)


def request_key(raw_path: str, *, mount: str, prefix: str, index_document: str) -> Key | Reject | Redirect:
    """Decode `request.raw_path` once and join it to `prefix` by concatenation (docs/reliability.md §4).

    The router only sends paths equal to `mount` or under `mount + "/"`; anything else is a 404.
    """
    # A fragment is not part of a request-target (RFC 9112 §3.2) but parsers pass a raw "#" through;
    # drop it as every URL parser (and the router, via yarl) does, rather than putting it in the key.
    target, _, _ = raw_path.partition("#")
    path, _, query = target.partition("?")
    if path == mount:  # never "" : the root mount's path is "/"
        return Redirect(mount + "/" + ("?" + quote(query, safe=_QUERY_SAFE) if query else ""))
    if path == mount + "/":
        rest = ""
    elif path.startswith(mount + "/"):
        rest = path[len(mount) + 1 :]
    else:
        return Reject(404, "not found")
    if _BAD_PERCENT.search(rest):
        return Reject(400, "invalid percent-encoding")
    try:
        # Exactly one decode, never unquote_plus: "+" is a literal character in S3 keys.
        relative = unquote(rest, errors="strict")
    except UnicodeDecodeError:
        return Reject(400, "invalid UTF-8 in path")
    if _CONTROL.search(relative) or "\\" in relative:
        return Reject(400, "invalid character in path")
    segments = relative.split("/")
    # An empty segment is only allowed last (a trailing slash); "//" and leading "/" are refused so that
    # the redirect below can never produce a protocol-relative Location.
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        return Reject(400, "invalid path segment")
    if "%2f" in rest or "%2F" in rest:
        # An encoded slash decodes to "/" (one decode, like every other escape), so the key is the one a
        # literal slash names. But to a browser "%2F" is data, not a separator (RFC 3986 §2.2): relative
        # links in a page served at /docs/guides%2F would resolve against /docs/ and break. Send the client
        # to the canonical spelling of the same key, wherever in the path the escape was.
        return Redirect(mount + "/" + quote(relative, safe=_LOCATION_SAFE)
                        + ("?" + quote(query, safe=_QUERY_SAFE) if query else ""))
    directory = relative == "" or relative.endswith("/")
    s3_key = prefix + relative + (index_document if directory else "")
    if len(s3_key.encode()) > MAX_KEY_BYTES:
        return Reject(400, "path too long")
    return Key(s3_key=s3_key, relative=relative, query=query, directory=directory)


def redirect_location(key: Key, *, mount: str) -> str:
    """The `dir` -> `dir/` Location: always a path on this host, with the query kept."""
    location = mount + "/" + quote(key.relative, safe=_LOCATION_SAFE) + "/"
    # request_key refuses empty segments, so this starts with exactly one "/"; keep that invariant loud.
    assert location.startswith("/") and not location.startswith("//"), location
    return location + ("?" + quote(key.query, safe=_QUERY_SAFE) if key.query else "")


def index_key(key: Key, index_document: str) -> str:
    """The key whose existence turns a missing `dir` into a redirect to `dir/`."""
    return key.s3_key + "/" + index_document

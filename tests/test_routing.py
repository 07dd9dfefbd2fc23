"""Routing table tests: Host and path to a site, without I/O (routing.py)."""

from __future__ import annotations

import pytest

from cachingproxy.config import parse_config
from cachingproxy.routing import Router, hostname, mount_matches

CONFIG = parse_config({"s3": {"bucket": "b"}, "sites": [
    {"name": "handbook", "hosts": ["handbook.corp"], "mount": "/"},
    {"name": "handbook-api", "hosts": ["handbook.corp"], "mount": "/api"},
    {"name": "wild", "hosts": ["*.docs.corp"], "mount": "/"},
    {"name": "any-api", "mount": "/api"},
    {"name": "any-root", "mount": "/"},
]})
ROUTER = Router.build(CONFIG.sites)


@pytest.mark.parametrize(("host", "path", "site"), [
    pytest.param("handbook.corp", "/x.html", "handbook", id="exact-host"),
    pytest.param("handbook.corp", "/api/x.html", "handbook-api", id="exact-host-longest-mount"),
    pytest.param("handbook.corp", "/api", "handbook-api", id="mount-itself"),
    pytest.param("handbook.corp", "/api?x=1", "handbook-api", id="mount-with-query"),
    pytest.param("handbook.corp", "/apiary/x.html", "handbook", id="segment-boundary"),
    pytest.param("HandBook.Corp.:8443", "/x.html", "handbook", id="case-port-trailing-dot"),
    pytest.param("a.docs.corp", "/api/x.html", "wild", id="wildcard-beats-any-host"),
    pytest.param("a.b.docs.corp", "/x.html", "any-root", id="wildcard-is-one-level"),
    pytest.param("docs.corp", "/x.html", "any-root", id="wildcard-not-the-parent"),
    pytest.param("elsewhere", "/api/x.html", "any-api", id="any-host-longest-mount"),
    pytest.param("", "/x.html", "any-root", id="no-host"),
    pytest.param("[::1]:8080", "/x.html", "any-root", id="ipv6-literal"),
])
def test_route(host: str, path: str, site: str) -> None:
    found = ROUTER.route(host, path)
    assert found is not None and found.name == site


def test_no_site_without_a_catch_all() -> None:
    router = Router.build(CONFIG.sites[:3])
    assert router.route("elsewhere", "/x.html") is None
    assert router.route("handbook.corp", "/x.html") is not None


@pytest.mark.parametrize(("host", "name"), [("Docs.Corp.:8080", "docs.corp"), ("[::1]:80", "::1"),
                                            ("bad host:x", "")])
def test_hostname(host: str, name: str) -> None:
    assert hostname(host) == name


@pytest.mark.parametrize(("mount", "path", "matches"), [
    ("", "/anything", True), ("/api", "/api", True), ("/api", "/api/", True), ("/api", "/apiary", False),
    ("/api", "/ap", False), ("/api", "/api?q", True),
])
def test_mount_matches(mount: str, path: str, matches: bool) -> None:
    assert mount_matches(mount, path) is matches

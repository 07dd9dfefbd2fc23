"""Raw request path -> S3 key, one row per rule (docs/reliability.md §3 keys, §4 traversal and redirects)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from cachingproxy.keys import (
    BadTarget,
    Key,
    OriginForm,
    Redirect,
    Reject,
    redirect_location,
    request_key,
    request_target,
)


def key(raw: str, mount: str = "/docs", prefix: str = "site/") -> Key | Reject | Redirect:
    return request_key(raw, mount=mount, prefix=prefix, index_document="index.html")


@pytest.mark.parametrize(("raw", "s3_key", "directory"), [
    pytest.param("/docs/", "site/index.html", True, id="mount-slash-serves-index"),
    pytest.param("/docs/guides/", "site/guides/index.html", True, id="dir-slash-serves-index"),
    pytest.param("/docs/guides", "site/guides", False, id="no-slash-is-an-object"),
    pytest.param("/docs/a%20b%2Bc/%C3%BC.html", "site/a b+c/ü.html", False, id="decoded-once-plus-literal"),
    pytest.param("/docs/a+b", "site/a+b", False, id="plus-is-not-space"),
    pytest.param("/docs/%2525", "site/%25", False, id="double-encoding-decoded-once"),
    pytest.param("/docs/a=b&c;d", "site/a=b&c;d", False, id="sub-delims-kept"),
    pytest.param("/docs/x.html?v=1&y", "site/x.html", False, id="query-not-in-key"),
    pytest.param("/docs/e%CC%81", "site/e\u0301", False, id="no-unicode-normalisation"),
    pytest.param("/docs/%C3%A9", "site/\u00e9", False, id="nfc-stays-nfc"),
    pytest.param("/docs/%252e%252e/x", "site/%2e%2e/x", False, id="double-encoded-dotdot-is-a-literal-name"),
    pytest.param("/docs/a.html#frag", "site/a.html", False, id="rfc9112-3.2-fragment-dropped"),
    pytest.param("/docs/a#b?c", "site/a", False, id="fragment-before-query-dropped-whole"),
])
def test_keys(raw: str, s3_key: str, directory: bool) -> None:
    result = key(raw)
    assert isinstance(result, Key)
    assert (result.s3_key, result.directory) == (s3_key, directory)


@pytest.mark.parametrize(("raw", "location"), [
    pytest.param("/docs", "/docs/", id="bare-mount"),
    pytest.param("/docs?a=1&b", "/docs/?a=1&b", id="query-kept"),
    pytest.param("/docs?//evil.example", "/docs/?//evil.example", id="query-cannot-become-authority"),
    pytest.param("/docs?a=\r\nX:1", "/docs/?a=%0D%0AX:1", id="raw-controls-encoded"),
])
def test_bare_mount_redirects_to_mount_slash(raw: str, location: str) -> None:
    # As for `dir` -> `dir/`: the index page's relative links must resolve under the mount.
    assert key(raw) == Redirect(location)


@pytest.mark.parametrize(("raw", "location"), [
    pytest.param("/docs/guides%2f", "/docs/guides/", id="encoded-trailing-slash"),
    pytest.param("/docs/guides%2Findex.html", "/docs/guides/index.html", id="encoded-inner-slash"),
    pytest.param("/docs/a%2Fb?x=1", "/docs/a/b?x=1", id="query-kept"),
    pytest.param("/docs/a%20b%2Fc", "/docs/a%20b/c", id="other-escapes-re-encoded"),
])
def test_encoded_slash_redirects_to_the_canonical_path(raw: str, location: str) -> None:
    """Issue 17 item 6: %2F names the same key as "/", but breaks a page's relative links (RFC 3986 §2.2)."""
    assert key(raw) == Redirect(location)


@pytest.mark.parametrize(("method", "target", "expected"), [
    pytest.param("GET", "/docs/x?q", OriginForm("/docs/x?q", None), id="origin-form"),
    pytest.param("GET", "http://h:8080/docs/x?q", OriginForm("/docs/x?q", "h:8080"), id="absolute-form-9112-3.2.2"),
    pytest.param("HEAD", "HTTPS://h/docs/%2e%2e/x", OriginForm("/docs/%2e%2e/x", "h"), id="scheme-case-path-verbatim"),
    pytest.param("GET", "http://h", OriginForm("/", "h"), id="empty-path-is-root-9110-4.2.3"),
    pytest.param("GET", "http://h?q=1", OriginForm("/?q=1", "h"), id="query-without-path"),
    pytest.param("GET", "http://[::1]:8/x", OriginForm("/x", "[::1]:8"), id="ip-literal"),
    pytest.param("GET", "http://u:pw@h/x", BadTarget(400, "invalid authority in request-target"),
                 id="userinfo-refused-9110-4.2.4"),
    pytest.param("GET", "http:///x", BadTarget(400, "invalid authority in request-target"), id="empty-authority"),
    pytest.param("GET", "ftp://h/x", BadTarget(400, "invalid request-target"), id="other-scheme"),
    pytest.param("GET", "h:443", BadTarget(400, "invalid request-target"), id="authority-form-without-connect"),
    pytest.param("CONNECT", "h:443", BadTarget(405, "CONNECT is not supported"), id="connect-9112-3.2.3"),
    pytest.param("OPTIONS", "*", BadTarget(405, "OPTIONS is not supported"), id="asterisk-options-9112-3.2.4"),
    pytest.param("GET", "*", BadTarget(400, "the asterisk-form is for OPTIONS only"), id="asterisk-get"),
])
def test_request_target_forms(method: str, target: str, expected: OriginForm | BadTarget) -> None:
    assert request_target(method, target) == expected


def test_root_mount() -> None:
    result = request_key("/a/b.html", mount="", prefix="", index_document="index.html")
    assert isinstance(result, Key) and result.s3_key == "a/b.html"
    root = request_key("/", mount="", prefix="", index_document="index.html")
    assert isinstance(root, Key) and root.s3_key == "index.html"


@pytest.mark.parametrize(("raw", "status"), [
    pytest.param("/docs/../x", 400, id="dotdot"),
    pytest.param("/docs/a/./b", 400, id="dot"),
    pytest.param("/docs/%2e%2e/x", 400, id="encoded-dotdot"),
    pytest.param("/docs/..%2fx", 400, id="dotdot-encoded-slash"),
    pytest.param("/docs/a%2F..%2Fb", 400, id="encoded-slash-dotdot"),
    pytest.param("/docs/a%5cb", 400, id="encoded-backslash"),
    pytest.param("/docs/a\\b", 400, id="backslash"),
    pytest.param("/docs/a%00b", 400, id="nul"),
    pytest.param("/docs/a%0d%0aSet-Cookie:x", 400, id="crlf"),
    pytest.param("/docs//evil.example", 400, id="double-slash"),
    pytest.param("/docs/%2F%2Fevil.example", 400, id="encoded-double-slash"),
    pytest.param("/docs/a//b", 400, id="empty-segment"),
    pytest.param("/docs/%zz", 400, id="bad-percent"),
    pytest.param("/docs/%C3%28", 400, id="invalid-utf8"),
    pytest.param("/docs/%c0%ae%c0%ae/x", 400, id="overlong-utf8-dot"),
    pytest.param("/docs/" + "a" * 1100, 400, id="longer-than-s3-allows"),
    pytest.param("/docsx/a", 404, id="outside-mount"),
])
def test_rejects(raw: str, status: int) -> None:
    result = key(raw)
    assert isinstance(result, Reject)
    assert result.status == status


@pytest.mark.parametrize(("raw", "mount", "location"), [
    pytest.param("/docs/guides", "/docs", "/docs/guides/", id="simple"),
    pytest.param("/docs/guides?a=1&b", "/docs", "/docs/guides/?a=1&b", id="query-kept"),
    pytest.param("/docs/a%20b/%C3%BC", "/docs", "/docs/a%20b/%C3%BC/", id="re-encoded"),
    pytest.param("/evil.example", "", "/evil.example/", id="root-mount-stays-on-host"),
    pytest.param("/a%3Fb", "", "/a%3Fb/", id="question-mark-in-key-stays-in-path"),
    pytest.param("/docs/g?x=1#frag", "/docs", "/docs/g/?x=1", id="fragment-not-carried"),
    pytest.param("/docs/g?a=%0d%0aSet-Cookie:x", "/docs", "/docs/g/?a=%0d%0aSet-Cookie:x", id="escapes-kept-as-sent"),
    pytest.param("/docs/g?a=\r\nX:\x01\u00fc", "/docs", "/docs/g/?a=%0D%0AX:%01%C3%BC", id="raw-controls-encoded"),
    pytest.param("/docs/g?//evil.example", "/docs", "/docs/g/?//evil.example", id="query-cannot-become-authority"),
])
def test_redirect_location_is_a_path_on_this_host(raw: str, mount: str, location: str) -> None:
    result = request_key(raw, mount=mount, prefix="", index_document="index.html")
    assert isinstance(result, Key)
    loc = redirect_location(result, mount=mount)
    assert loc == location
    assert urlsplit(loc).netloc == "" and loc.startswith("/") and not loc.startswith("//")

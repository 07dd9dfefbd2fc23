"""TLS for the proxy's port and the admin listener: one server SSLContext per certificate, or a one-line
reason naming the file. Loaded by each worker (after fork: an SSLContext is not shared across processes)."""

from __future__ import annotations

import os
import ssl

from .config import Config, ConfigError

__all__ = ["admin_context", "check_tls", "proxy_context", "server_context"]


def server_context(certificate: str, key: str, where: str) -> ssl.SSLContext:
    """HTTPS only, TLS 1.2 at least, Python's secure defaults for ciphers (no compression, no renegotiation).

    The certificate file may hold the whole chain, which is then served whole.
    """
    for path, name in ((certificate, "tls_certificate"), (key, "tls_key")):
        if not os.access(path, os.R_OK):
            reason = "file not found" if not os.path.exists(path) else "cannot read (permissions)"
            raise ConfigError(f"{path}: {reason} ({where}.{name})")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:  # a PEM certificate at all, checked apart so the message names the right file
        ssl.create_default_context().load_verify_locations(cafile=certificate)
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"{certificate}: not a PEM certificate ({where}.tls_certificate)") from None
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key}: does not match the certificate {certificate} ({where}.tls_key)") from None
        raise ConfigError(f"{key}: not a PEM private key, or encrypted ({where}.tls_key)") from None
    return context


def admin_context(config: Config) -> ssl.SSLContext | None:
    admin = config.admin
    return server_context(admin.tls_certificate, admin.tls_key, "admin") if admin.tls_certificate else None


def proxy_context(config: Config) -> ssl.SSLContext | None:
    server = config.server
    return server_context(server.tls_certificate, server.tls_key, "server") if server.tls_certificate else None


def check_tls(config: Config) -> list[str]:
    """Every certificate and key of `config` loaded once; the problems, one line each."""
    problems = []
    for load in (proxy_context, admin_context):
        try:
            load(config)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems

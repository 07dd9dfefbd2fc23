"""Command line: `cachingproxy serve [--config PATH]`, and `warm`, `stats`, `purge` against a running proxy."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import ConfigError, load_config

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cachingproxy: {exc}", file=sys.stderr)
        return 2
    # Imported here so that `--help` and config errors stay instant.
    from .logsetup import configure_logging
    from .reload import preflight
    from .workers import run_workers

    # Fail closed: a site whose password file cannot be read or holds a weak hash is not served at all, nor
    # a port whose certificate does not load.
    problems = preflight(config, args.config)
    for problem in problems:
        print(f"cachingproxy: {problem}", file=sys.stderr)
    if problems:
        return 2

    configure_logging(secrets=(config.admin.token,))
    server = config.server
    try:
        # [server] workers processes on one port; each exits 0 on SIGTERM/SIGINT after a graceful drain.
        return run_workers(config, server.workers, path=args.config)
    except OSError as exc:
        print(f"cachingproxy: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    """`cachingproxy check --config FILE`, like `nginx -t`: everything `serve` checks before it starts (the
    file, AWS profiles, htpasswd files, certificates), nothing started; 0 and the effective sites, or 1."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"cachingproxy: {line}", file=sys.stderr)
        return 1
    from .access import load_access
    from .reload import preflight

    problems = preflight(config, args.config)
    users: dict[str, int] = {}
    for site in config.sites if not problems else ():
        access = load_access(site)
        if access is not None and access.users is not None:
            users[site.name] = len(access.users)
    for problem in problems:
        print(f"cachingproxy: {problem}", file=sys.stderr)
    if problems:
        return 1
    server = config.server
    scheme = "https" if server.tls_certificate else "http"
    redirect = f", plain :{server.redirect_http_port} redirects to it" if server.redirect_http_port else ""
    print(f"cachingproxy: {args.config} is valid")
    print(f"listen {scheme}://{server.host}:{server.port}{redirect}; workers {server.workers or 'one per core'}; "
          f"cache {config.cache.directory} ({config.cache.size_limit_mb} MB)")
    for site in config.sites:
        s3 = site.s3
        where = f"s3://{s3.bucket}/{s3.prefix}" + (f" at {s3.endpoint_url}" if s3.endpoint_url else "")
        rules = []
        if site.access.allow:
            rules.append("allow " + " ".join(site.access.allow))
        if site.access.htpasswd:
            rules.append(f"htpasswd {site.access.htpasswd} ({users.get(site.name, 0)} users)")
        print(f"site {site.name}: hosts {' '.join(site.hosts) or '(any)'}; mount {site.mount or '/'}; {where}; "
              f"ttl {site.cache.ttl:g} s, {len(site.cache.rules)} rules; {'; '.join(rules) or 'open to all'}")
    return 0


def _admin_client(args: argparse.Namespace) -> int:
    from .admin_client import run  # imported here: the aiohttp client is not needed for `serve` or `--help`

    return run(args)


def _add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`warm`, `stats` and `purge`: clients of a running proxy's admin API (cachingproxy/admin_client.py)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("CACHINGPROXY_URL", "http://127.0.0.1:8080"),
                        help="the proxy, or its admin listener: http://host:port[/admin-path] "
                             "(default: $CACHINGPROXY_URL or http://127.0.0.1:8080; path default /_admin)")
    common.add_argument("--token", default="",
                        help="admin token (default: $CACHINGPROXY_ADMIN_TOKEN; prefer the variable, "
                             "since other users can read a command line)")
    common.add_argument("--site", default=None,
                        help="the site (a [[sites]] name) for warm and purge; needed when there are several")
    warm = commands.add_parser("warm", parents=[common], help="warm the cache under a prefix, showing progress")
    warm.add_argument("prefix", nargs="?", default="", help="key prefix below [s3] prefix (default: everything)")
    stats = commands.add_parser("stats", parents=[common], help="print the proxy's counters")
    stats.add_argument("--json", action="store_true", help="print the raw JSON instead of tables")
    purge = commands.add_parser("purge", parents=[common], help="remove cached objects")
    scope = purge.add_mutually_exclusive_group(required=True)
    scope.add_argument("--key", help="one key below [s3] prefix")
    scope.add_argument("--prefix", help="every key under this prefix")
    scope.add_argument("--all", action="store_true", help="everything")
    for parser in (warm, stats, purge):
        parser.set_defaults(func=_admin_client)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachingproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cachingproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="config.toml", help="config file (default: ./config.toml)")
    serve.set_defaults(func=_serve)
    check = commands.add_parser("check", help="validate a config file and print the effective sites (nginx -t)")
    check.add_argument("--config", default="config.toml", help="config file (default: ./config.toml)")
    check.set_defaults(func=_check)
    _add_admin_commands(commands)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

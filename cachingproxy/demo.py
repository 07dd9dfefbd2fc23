"""`make demo`: an in-process fake S3 holding the sample docs site, with the proxy in front of it.

Run as ``python -m cachingproxy.demo [--port 8080] [--s3-port 0]``. moto and boto3 come from the
optional ``demo`` extra, so they are imported only when the demo (or a test seeding a bucket) runs.

The admin API is on, with a fresh random token each run, printed with the URLs to try (as Jupyter prints
its token). The config file is the operator's to edit: it is written once, and later runs change only what
the demo owns (the fake S3's endpoint, which moves every run, and the port when ``--port`` is given).
"""

from __future__ import annotations

import argparse
import io
import logging
import mimetypes
import os
import random
import re
import secrets
import shlex
import sys
import zipfile
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ADMIN_TOKEN_ENV, Config, ConfigError, load_config

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

__all__ = ["banner", "main", "seed_bucket", "set_toml_value"]

BUCKET = "docs-demo"
PREFIX = "site/"
# The second site: the same pages from another bucket, under /handbook, with folder listings on (its
# downloads/ folder has no index page), to show several sites in one proxy.
HANDBOOK_BUCKET = "handbook-demo"
REGION = "us-east-1"
DOWNLOAD_KEY = "downloads/handbook.zip"
DOWNLOAD_SIZE = 8 * 1024 * 1024

# Explicit charsets, because browsers otherwise guess, and mimetypes' answers vary by platform
# (.js is application/javascript on some systems, text/javascript on others).
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".zip": "application/zip",
}
_HTML_CACHE_CONTROL = "max-age=60"
DEFAULT_PORT = 8080


def _content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def _walk(node: Traversable, rel: str = "") -> dict[str, bytes]:
    # Traversable rather than Path so this also works when the package is installed as a zip.
    found: dict[str, bytes] = {}
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.name.startswith(".") or child.name == "__pycache__":
            continue
        path = f"{rel}{child.name}"
        if child.is_dir():
            found.update(_walk(child, path + "/"))
        else:
            found[path] = child.read_bytes()
    return found


def _site_root() -> Traversable:
    try:
        return files("cachingproxy") / "sample_site"
    except NotADirectoryError:
        # Python 3.11's files() rejects a namespace package (no __init__.py) whose __path__ holds
        # setuptools' editable-install placeholder; the site ships next to this module either way.
        return Path(__file__).with_name("sample_site")


def _sample_site() -> dict[str, bytes]:
    """The shipped sample site as ``{relative/path: bytes}``."""
    return _walk(_site_root())


def _build_handbook_zip(site: dict[str, bytes], size: int = DOWNLOAD_SIZE) -> bytes:
    """A deterministic archive of about ``size`` bytes, big enough that the proxy has to stream it."""
    # Fixed timestamps and attributes: the bytes, and so the S3 ETag, are identical on every run,
    # which keeps a cache directory from an earlier demo run valid.
    def info(name: str) -> zipfile.ZipInfo:
        zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
        zi.compress_type = zipfile.ZIP_STORED
        zi.create_system = 3
        zi.external_attr = 0o644 << 16
        return zi

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for rel, body in site.items():
            zf.writestr(info(f"handbook/{rel}"), body)
        # Random bytes so neither the archive nor any transport compression shrinks it.
        padding = max(0, size - buf.tell() - 1024)
        zf.writestr(info("handbook/assets/offline-bundle.bin"), random.Random(42).randbytes(padding))
    return buf.getvalue()


def seed_bucket(endpoint_url: str, bucket: str, prefix: str = PREFIX) -> dict[str, bytes]:
    """Create ``bucket`` on a moto (or other S3-compatible) endpoint and upload the sample site under
    ``prefix``; return ``{key_relative_to_prefix: body}`` for everything uploaded."""
    import boto3  # type: ignore[import-untyped]

    # Any credentials do for moto; taking the environment's first lets a caller pick its own.
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=os.environ.get("AWS_DEFAULT_REGION", REGION),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    )
    try:
        if s3.meta.region_name == "us-east-1":
            s3.create_bucket(Bucket=bucket)
        else:
            s3.create_bucket(Bucket=bucket,
                             CreateBucketConfiguration={"LocationConstraint": s3.meta.region_name})
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass

    objects = _sample_site()
    objects[DOWNLOAD_KEY] = _build_handbook_zip(objects)
    for rel, body in objects.items():
        extra: dict[str, str] = {"ContentType": _content_type(rel)}
        if rel.endswith(".html"):
            extra["CacheControl"] = _HTML_CACHE_CONTROL
        # put_object, not upload_fileobj: one part, so every ETag is the body's MD5 (the 8 MB zip
        # would otherwise cross boto3's multipart threshold).
        s3.put_object(Bucket=bucket, Key=prefix + rel, Body=body, **extra)
    return objects


def _start_moto(port: int = 0) -> tuple[ThreadedMotoServer, str]:
    """Start moto's S3 in a background thread; return the server and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every S3 request to stderr even with verbose=False, burying the proxy's output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    return server, f"http://{host}:{bound}"


def _config_text(*, port: int, endpoint_url: str, cache_dir: Path) -> str:
    return f"""\
# Written by the first `make demo` and yours to edit: later runs keep it and change only [s3] endpoint_url
# (the fake S3 gets a new port every run) and [server] port when --port is given. Delete it to start over.
# The admin token comes from CACHINGPROXY_ADMIN_TOKEN, which the demo sets afresh each run.

[server]
host = "127.0.0.1"
port = {port}

# Defaults for every site below.
[s3]
region = "{REGION}"
endpoint_url = "{endpoint_url}"
addressing_style = "path"

[cache]
directory = "{cache_dir.as_posix()}"
ttl = 60
error_document = "404.html"

[[sites]]
name = "docs"
mount = "/docs"
[sites.s3]
bucket = "{BUCKET}"
prefix = "{PREFIX}"

[[sites]]
name = "handbook"
mount = "/handbook"
listing = true
[sites.s3]
bucket = "{HANDBOOK_BUCKET}"
"""


def set_toml_value(text: str, section: str, key: str, literal: str) -> str:
    """`text` with `key = literal` in `[section]`: the existing line replaced (its comment and every other line
    kept), or one added at the top of the section. Enough TOML for the file this module writes; not a parser."""
    lines = text.splitlines(keepends=True)
    header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")  # [table] or [[array of tables]]
    assignment = re.compile(rf"^(\s*){re.escape(key)}\s*=")
    current = ""
    section_at: int | None = None
    for i, line in enumerate(lines):
        found = header.match(line)
        if found:
            current = found[2] if found[1] == "[" else f"[{found[2]}]"  # never equal to a plain table's name
            if current == section:
                section_at = i
            continue
        if current == section and assignment.match(line):
            lines[i] = f"{key} = {literal}\n"
            return "".join(lines)
    if section_at is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + f"\n[{section}]\n{key} = {literal}\n"
    lines.insert(section_at + 1, f"{key} = {literal}\n")
    return "".join(lines)


def _write_config(directory: Path, *, port: int | None, endpoint_url: str) -> Path:
    """Write the demo's config the first time; afterwards keep the operator's edits (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    if not path.exists():
        path.write_text(_config_text(port=port or DEFAULT_PORT, endpoint_url=endpoint_url,
                                     cache_dir=directory / "cache"), encoding="utf-8")
        return path
    text = set_toml_value(path.read_text(encoding="utf-8"), "s3", "endpoint_url", f'"{endpoint_url}"')
    if port is not None:
        text = set_toml_value(text, "server", "port", str(port))
    path.write_text(text, encoding="utf-8")
    return path


def _command(name: str) -> str:
    """How to run this environment's `name` script from here: `.venv/bin/cachingproxy` under `make demo`."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        return name
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def banner(config: Config, token: str, *, endpoint_url: str, objects: int, config_path: Path) -> str:
    """What the demo prints before the proxy starts: every URL to try, with the token (new each run)."""
    server, admin = config.server, config.admin
    proxy = f"http://{server.host}:{server.port}"
    admin_base = f"http://{admin.host}:{admin.port}{admin.path}" if admin.port else proxy + admin.path
    auth = f'-H "Authorization: Bearer {token}"'
    sites = "".join(f"  {site.name.capitalize() + ':':<11} {proxy}{site.mount}/\n" for site in config.sites)
    buckets = ", ".join(sorted({f"{site.s3.bucket!r}" for site in config.sites}))
    site = f" --site {config.sites[0].name}" if len(config.sites) > 1 else ""  # required with several
    return f"""
{sites}  Dashboard:  {admin_base}/   (paste the token into its login form)
  Stats:      {admin_base}/stats
  Metrics:    {admin_base}/metrics
  Token:      {token}   (new every run: it is only in this process's CACHINGPROXY_ADMIN_TOKEN)

  Try:
    curl {auth} {admin_base}/stats
    curl {auth} {admin_base}/metrics
    CACHINGPROXY_ADMIN_TOKEN={token} {_command("cachingproxy")} warm --url {admin_base}{site}

  S3:         {endpoint_url}  (moto: buckets {buckets}, {objects} objects each)
  Config:     {config_path}  (yours to edit and kept across runs; the demo rewrites only [s3] endpoint_url,
              and [server] port when --port is given; delete the file to start over)

  Ctrl-C to stop.
"""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cachingproxy.demo",
        description="Serve the sample docs site from an in-process fake S3 through the caching proxy.",
    )
    parser.add_argument("--port", type=int, default=None,
                        help=f"proxy port, written to the config (default: the config's, {DEFAULT_PORT} at first)")
    parser.add_argument("--s3-port", type=int, default=0, help="fake S3 port (default: 0, any free port)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # The proxy's S3 client refuses to sign requests without credentials, even though moto ignores them.
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", REGION)):
        os.environ.setdefault(name, value)

    server, endpoint_url = _start_moto(args.s3_port)
    try:
        objects = seed_bucket(endpoint_url, BUCKET, PREFIX)
        seed_bucket(endpoint_url, HANDBOOK_BUCKET, "")
        config_path = _write_config(Path("demo-cache"), port=args.port, endpoint_url=endpoint_url)
        token = secrets.token_urlsafe(18)
        os.environ[ADMIN_TOKEN_ENV] = token  # wins over [admin] token in the file (config.with_env_token)
        try:
            config = load_config(str(config_path))
        except ConfigError as exc:
            print(f"cachingproxy demo: {exc}", file=sys.stderr)
            return 2
        print(banner(config, token, endpoint_url=endpoint_url, objects=len(objects), config_path=config_path),
              flush=True)
        from cachingproxy.__main__ import main as proxy_main

        return proxy_main(["serve", "--config", str(config_path)])
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())

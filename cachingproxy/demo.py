"""`make demo`: an in-process fake S3 holding the sample docs site, with the proxy in front of it.

Run as ``python -m cachingproxy.demo [--port 8080] [--s3-port 0]``. moto and boto3 come from the
optional ``demo`` extra, so they are imported only when the demo (or a test seeding a bucket) runs.
"""

from __future__ import annotations

import argparse
import io
import logging
import mimetypes
import os
import random
import zipfile
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

__all__ = ["main", "seed_bucket"]

BUCKET = "docs-demo"
PREFIX = "site/"
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


def _write_config(directory: Path, *, port: int, endpoint_url: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(
        f"""\
[server]
host = "127.0.0.1"
port = {port}
mount = "/docs"

[s3]
bucket = "{BUCKET}"
prefix = "{PREFIX}"
region = "{REGION}"
endpoint_url = "{endpoint_url}"
addressing_style = "path"

[cache]
directory = "{(directory / "cache").as_posix()}"
ttl = 60
error_document = "404.html"
""",
        encoding="utf-8",
    )
    return path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cachingproxy.demo",
        description="Serve the sample docs site from an in-process fake S3 through the caching proxy.",
    )
    parser.add_argument("--port", type=int, default=8080, help="proxy port (default: 8080)")
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
        config_path = _write_config(Path("demo-cache"), port=args.port, endpoint_url=endpoint_url)
        print(
            f"\n  Docs:    http://127.0.0.1:{args.port}/docs/\n"
            f"  S3:      {endpoint_url}  (moto, bucket {BUCKET!r}, {len(objects)} objects under {PREFIX!r})\n"
            f"  Config:  {config_path}\n"
            f"\n  Ctrl-C to stop.\n",
            flush=True,
        )
        from cachingproxy.__main__ import main as proxy_main

        return proxy_main(["serve", "--config", str(config_path)])
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())

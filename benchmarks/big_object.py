"""docs/reliability.md §6 rows 20 and 21: a 1 GiB object on miss and on hit, with 200 small hits beside it.

Reports the proxy's peak RSS growth (VmHWM, reset through /proc/self/clear_refs before each phase) and the
event loop's worst lag (a 5 ms ticker inside the proxy's loop). moto runs as its own process, because it
buffers whole objects in memory (docs/reliability.md §5), and the clients are curl processes, so the figures are
the proxy's alone.

    .venv/bin/python benchmarks/big_object.py [--size-mb 1024] [--hits 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
from aiohttp import web
from boto3.s3.transfer import TransferConfig

from cachingproxy.app import create_app
from cachingproxy.config import parse_config

BUCKET = "big-object-bench"
TICK = 0.005
RESULTS = Path(__file__).parent / "results" / "big-object.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def vm(field: str) -> int:
    """A /proc/self/status figure in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (proc(5))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def seed(moto_url: str, source: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    # One part: a single-part upload keeps an MD5 ETag, so the proxy verifies the whole body as it streams.
    s3.upload_file(str(source), BUCKET, "big.bin", Config=TransferConfig(multipart_threshold=1 << 40))
    s3.put_object(Bucket=BUCKET, Key="small.html", Body=b"<p>small</p>" * 400)


async def curl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"curl exited {proc.returncode}"
    return out.decode()


async def phase(base: str, hits: int, out: Path, expected: str) -> dict[str, object]:
    reset_peak_rss()
    baseline = vm("VmRSS")
    lag = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(TICK)
            lag = max(lag, time.perf_counter() - started - TICK)

    probe = asyncio.create_task(ticker())
    started = time.perf_counter()
    big = asyncio.create_task(curl("-o", str(out), "-w", "%{http_code} %header{x-cache} %{size_download}",
                                   f"{base}/big.bin"))
    small_args: list[str] = []
    for _ in range(hits):
        small_args += ["-o", "/dev/null", "-w", "%{http_code}\n", f"{base}/small.html"]
    small = await curl(*small_args)
    big_result = await big
    elapsed = time.perf_counter() - started
    stop.set()
    await probe
    status, outcome, size = big_result.split(" ")
    assert status == "200", f"the proxy answered {status} for the big object"
    exact = await asyncio.to_thread(sha256_file, out) == expected
    await asyncio.to_thread(out.unlink)
    return {
        "x-cache": outcome,
        "status": status,
        "bytes": int(size),
        "byte-exact": exact,
        "small 200s": f"{small.split().count('200')}/{hits}",
        "seconds": round(elapsed, 1),
        "MB/s": round(int(size) / elapsed / 1e6),
        "peak RSS growth MiB": round((vm("VmHWM") - baseline) / 1024, 1),
        "max loop lag ms": round(lag * 1000, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--hits", type=int, default=200)
    args = parser.parse_args()
    # moto accepts any credentials; the proxy takes them from the standard chain like in production.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with tempfile.TemporaryDirectory(prefix="cachingproxy-big-") as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "source.bin"
        with source.open("wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        expected = sha256_file(source)
        moto, moto_url = start_moto()
        try:
            seed(moto_url, source)
            source.unlink()
            config = parse_config({
                "server": {"mount": "/docs"},
                "s3": {"bucket": BUCKET, "endpoint_url": moto_url, "addressing_style": "path",
                       "read_timeout": 60.0, "request_timeout": 600.0},
                "cache": {"directory": str(tmp / "cache"), "size_limit_mb": 4 * args.size_mb, "ttl": 3600},
            }, "benchmarks/big_object.py")
            runner = web.AppRunner(create_app(config), access_log=None)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            base = f"http://127.0.0.1:{port}/docs"
            try:
                await curl("-o", "/dev/null", f"{base}/small.html")  # cached before the measured phases
                rows = {"miss": await phase(base, args.hits, tmp / "out.bin", expected)}
                rows["hit"] = await phase(base, args.hits, tmp / "out.bin", expected)
            finally:
                await runner.cleanup()
        finally:
            moto.terminate()
            moto.wait()
    columns = list(rows["miss"])
    lines = [
        f"# {args.size_mb} MiB object with {args.hits} small hits beside it",
        "",
        f"`.venv/bin/python benchmarks/big_object.py --size-mb {args.size_mb} --hits {args.hits}` on "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| phase | " + " | ".join(columns) + " |",
        "| --- |" + " ---: |" * len(columns),
        *(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |" for name, row in rows.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())

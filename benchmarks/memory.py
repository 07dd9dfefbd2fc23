"""Issue 17: the proxy's memory under a full disk and under many clients of one cold object, from /proc.

Two scenarios, each against a fresh proxy process (`python -m cachingproxy serve`) in front of moto (its own
process: it holds whole objects in memory), with aiohttp clients in this process, so the figures are the
proxy's alone. RSS is VmRSS of the proxy's processes (supervisor and worker), sampled every 10 ms; "idle"
is after a warm-up request.

- `full-disk`: the cache on a 20 MiB tmpfs (needs root to mount), `size_limit_mb = 1024`, four concurrent
  GETs of different cold objects of `--full-disk-mb` MiB each.
- `clients`: `--clients` concurrent GETs of one cold `--object-mb` MiB object, the cache on an ordinary disk.

Every body is checked for length and CRC-32 against the source.

    .venv/bin/python benchmarks/memory.py [--clients 250] [--object-mb 64] [--full-disk-mb 48]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import aiohttp
import boto3

sys.path.insert(0, str(Path(__file__).parent))
from big_object import free_port, start_moto  # the same directory: scripts, not a package

BUCKET = "memory-bench"
RESULTS = Path(__file__).parent / "results" / "memory.md"
SAMPLE = 0.01


def rss_kib(pid: int) -> int:
    """VmRSS of the proxy's worker: `serve` runs a supervisor (no asyncio, a few MiB) and one worker."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in [pid, *map(int, children)]:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def seed(moto_url: str, objects: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    for key, body in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def start_proxy(tmp: Path, cache_dir: Path, moto_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = tmp / "config.toml"
    config.write_text(f"""
[server]
port = {port}
workers = 1
mount = "/docs"
send_timeout = 120.0
[s3]
bucket = "{BUCKET}"
endpoint_url = "{moto_url}"
addressing_style = "path"
read_timeout = 60.0
request_timeout = 600.0
[cache]
directory = "{cache_dir}"
size_limit_mb = 1024
ttl = 3600
""")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-m", "cachingproxy", "serve", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1).close()
            return proc, base + "/docs"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, int, str]:
    """(bytes, CRC-32, X-Cache) of one GET, read as it arrives."""
    async with session.get(url) as resp:
        assert resp.status == 200, f"{resp.status} for {url}"
        crc, size = 0, 0
        async for chunk in resp.content.iter_chunked(1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        return size, crc, resp.headers.get("X-Cache", "")


async def run(pid: int, base: str, keys: list[str], objects: dict[str, bytes]) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        await fetch(session, base + "/warm.txt")  # idle = after the first request (imports, pools, caches)
        idle = rss_kib(pid)
        peak = idle
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, await asyncio.to_thread(rss_kib, pid))
                await asyncio.sleep(SAMPLE)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        results = await asyncio.gather(*(fetch(session, f"{base}/{key}") for key in keys))
        elapsed = time.perf_counter() - started
        stop.set()
        await sampler
        after = rss_kib(pid)
    want = {key: (len(body), zlib.crc32(body)) for key, body in objects.items()}
    exact = sum(1 for key, (size, crc, _) in zip(keys, results, strict=True) if (size, crc) == want[key])
    return {
        "clients": len(keys),
        "byte-exact": f"{exact}/{len(keys)}",
        "seconds": round(elapsed, 1),
        "idle RSS MiB": round(idle / 1024, 1),
        "peak RSS MiB": round(peak / 1024, 1),
        "peak above idle MiB": round((peak - idle) / 1024, 1),
        "after MiB": round(after / 1024, 1),
    }


async def scenario(name: str, tmp: Path, moto_url: str, keys: list[str], objects: dict[str, bytes],
                   cache_dir: Path) -> dict[str, object]:
    proc, base = start_proxy(tmp, cache_dir, moto_url)
    try:
        row = await run(proc.pid, base, keys, objects)
    finally:
        proc.terminate()
        proc.wait()
    print(name, row, flush=True)
    return row


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=250)
    parser.add_argument("--object-mb", type=int, default=64)
    parser.add_argument("--full-disk-mb", type=int, default=48)
    parser.add_argument("--only", choices=["full-disk", "clients"])
    args = parser.parse_args()
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="cachingproxy-mem-") as tmp_name:
        tmp = Path(tmp_name)
        full = {f"full{i}.bin": os.urandom(args.full_disk_mb << 20) for i in range(4)}
        one = {"one.bin": os.urandom(args.object_mb << 20)}
        moto, moto_url = start_moto()
        try:
            seed(moto_url, {**full, **one, "warm.txt": b"warm"})
            if args.only in (None, "full-disk"):
                disk = tmp / "tmpfs"
                disk.mkdir()
                await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                                        check=True)
                try:
                    rows[f"full disk: 4 x {args.full_disk_mb} MiB, 20 MiB tmpfs"] = await scenario(
                        "full-disk", tmp, moto_url, list(full), full, disk / "cache")
                finally:
                    await asyncio.to_thread(subprocess.run, ["umount", "-l", str(disk)], check=False)
            if args.only in (None, "clients"):
                rows[f"{args.clients} clients, one cold {args.object_mb} MiB object"] = await scenario(
                    "clients", tmp, moto_url, ["one.bin"] * args.clients, one, tmp / "cache")
        finally:
            moto.terminate()
            moto.wait()
    columns = list(next(iter(rows.values())))
    lines = [
        "# The proxy's RSS under a full disk and under many clients of one cold object",
        "",
        f"`.venv/bin/python benchmarks/memory.py --clients {args.clients} --object-mb {args.object_mb} "
        f"--full-disk-mb {args.full_disk_mb}` on {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| scenario | " + " | ".join(columns) + " |",
        "| --- |" + " ---: |" * len(columns),
        *(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |" for name, row in rows.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.only is None:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())

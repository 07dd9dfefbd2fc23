"""Issue 17 item 2: one cold object asked for through every worker at once, with S3 behind a slow link.

moto, the benchmark shim (benchmarks/shim.py, here limiting each body to `--rate` bytes a second) and the
proxy (`python -m cachingproxy serve`, `--workers` processes on one port) each run as their own process.
`--clients` clients, each on its own connection (so the kernel spreads them over the workers), ask at once
for `Range: bytes=0-99` of a cold `--object-mb` MiB object; then one client reads the whole object. The
figures: how long each Range client waited, and how many GetObject requests reached the shim.

    .venv/bin/python benchmarks/shared_fill.py [--workers 2] [--clients 12] [--object-mb 64] [--rate 5000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import boto3

sys.path.insert(0, str(Path(__file__).parent))
from big_object import free_port, start_moto  # the same directory: scripts, not a package

BUCKET = "shared-fill-bench"
RESULTS = Path(__file__).parent / "results" / "shared-fill.md"


def wait_for(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)


async def timed_get(url: str, headers: dict[str, str]) -> tuple[float, int, bytes]:
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session, \
            session.get(url, headers=headers) as resp:
        body = await resp.read()
        return time.perf_counter() - started, resp.status, body


def start(tmp: Path, args: argparse.Namespace, body: bytes, procs: list[subprocess.Popen[bytes]]) -> tuple[str, str]:
    """moto, the shim and the proxy, each its own process; returns (the object's URL, the shim's URL)."""
    moto, moto_url = start_moto()
    procs.append(moto)
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="big.bin", Body=body)
    shim_port = free_port()
    shim = subprocess.Popen([sys.executable, str(Path(__file__).parent / "shim.py"), "--port", str(shim_port),
                             "--upstream", moto_url, "--delay", "0", "--rate", str(args.rate)])
    procs.append(shim)
    shim_url = f"http://127.0.0.1:{shim_port}"
    wait_for(shim_url + "/__shim__/counts", shim)
    port = free_port()
    config = tmp / "config.toml"
    config.write_text(f"""
[server]
port = {port}
mount = "/docs"
workers = {args.workers}
[s3]
bucket = "{BUCKET}"
endpoint_url = "{shim_url}"
addressing_style = "path"
read_timeout = 60.0
request_timeout = 600.0
[cache]
directory = "{tmp / 'cache'}"
size_limit_mb = {4 * args.object_mb}
""")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proxy = subprocess.Popen([sys.executable, "-m", "cachingproxy", "serve", "--config", str(config)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proxy)
    wait_for(f"http://127.0.0.1:{port}/healthz", proxy)
    return f"http://127.0.0.1:{port}/docs/big.bin", shim_url


async def measure(url: str, clients: int) -> tuple[list[tuple[float, int, bytes]], tuple[float, int, bytes]]:
    ranges = await asyncio.gather(*(timed_get(url, {"Range": "bytes=0-99"}) for _ in range(clients)))
    return list(ranges), await timed_get(url, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--object-mb", type=int, default=64)
    parser.add_argument("--rate", type=float, default=5_000_000)
    args = parser.parse_args()
    body = os.urandom(args.object_mb << 20)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="cachingproxy-shared-") as tmp_name:
        try:
            url, shim_url = start(Path(tmp_name), args, body, procs)
            ranges, whole = asyncio.run(measure(url, args.clients))
            with urllib.request.urlopen(shim_url + "/__shim__/counts") as resp:
                counts = json.loads(resp.read())
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait()
    waits = sorted(seconds for seconds, _, _ in ranges)
    exact = sum(1 for _, status, got in ranges if status == 206 and got == body[:100])
    row = {
        "workers": args.workers,
        "Range clients": args.clients,
        "206 byte-exact": f"{exact}/{args.clients}",
        "fastest s": round(waits[0], 2),
        "median s": round(waits[len(waits) // 2], 2),
        "slowest s": round(waits[-1], 2),
        "whole object s": round(whole[0], 1),
        "whole byte-exact": whole[1] == 200 and whole[2] == body,
        "S3 GETs": counts.get("GET", 0),
    }
    lines = [
        f"# {args.clients} Range clients of one cold {args.object_mb} MiB object over {args.workers} workers, "
        f"S3 at {args.rate / 1e6:g} MB/s",
        "",
        f"`.venv/bin/python benchmarks/shared_fill.py --workers {args.workers} --clients {args.clients} "
        f"--object-mb {args.object_mb} --rate {args.rate:g}` on {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| " + " | ".join(row) + " |",
        "|" + " ---: |" * len(row),
        "| " + " | ".join(str(v) for v in row.values()) + " |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()

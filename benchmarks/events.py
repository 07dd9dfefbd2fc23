"""Issue 13: what S3 event notifications buy. Two figures, written to benchmarks/results/events.md.

1. Publish-to-visible latency, live: moto's server (its own process) delivers each PutObject's notification to
   an SQS queue; the proxy's consumer long-polls it (wait_seconds 20) and refreshes the key; a client polls the
   proxy every 5 ms until it serves the new body. p50/p99 over `--updates` updates, rotating over 10 keys.
2. S3 requests per hour for a 10,000-key site viewed continuously, TTL 300 s without events against TTL 24 h
   with events, 1 % of keys changing an hour. A model, not an hour-long run: every view goes through the real
   decision table (policy.decide, with the TTL windows the handler uses), and every change through the rule
   service.mark_stale applies (or a refresh GET, as events.py does with refresh = true); each action costs
   the S3 requests the service would send for it. The one-time LIST sweep at start is added in.

    .venv/bin/python benchmarks/events.py [--updates 200] [--keys 10000] [--view-interval 60]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import boto3
from aiohttp import web

from cachingproxy.app import EVENTS, create_app
from cachingproxy.appkeys import COUNTERS
from cachingproxy.config import parse_config
from cachingproxy.models import Entry, ObjectMeta
from cachingproxy.policy import Fetch, Revalidate, Serve, Windows, decide

BUCKET = "events-bench"
RESULTS = Path(__file__).parent / "results" / "events.md"
POLL = 0.005


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


async def latency(updates: int, tmp: Path) -> dict[str, object]:
    moto, moto_url = start_moto()
    try:
        s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
        sqs = boto3.client("sqs", endpoint_url=moto_url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        queue_url = sqs.create_queue(QueueName="office")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
        keys = [f"page{i}.html" for i in range(10)]
        for key in keys:
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"v0")
        config = parse_config({
            "server": {"mount": "/docs"},
            "s3": {"bucket": BUCKET, "endpoint_url": moto_url, "addressing_style": "path"},
            "cache": {"directory": str(tmp / "cache"), "ttl": 86400},
            "events": {"queue_url": queue_url, "endpoint_url": moto_url, "wait_seconds": 20},
        }, "benchmarks/events.py")
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}/docs/"
        seconds: list[float] = []
        try:
            async with aiohttp.ClientSession() as client:
                for key in keys:
                    async with client.get(base + key) as resp:
                        await resp.read()
                await asyncio.wait_for(app[EVENTS].swept.wait(), 30)
                counters = app[COUNTERS]
                heads, gets = counters.get("s3_head"), counters.get("s3_get")
                for i in range(1, updates + 1):
                    key, body = keys[i % len(keys)], f"v{i}".encode()
                    started = time.perf_counter()
                    await asyncio.to_thread(s3.put_object, Bucket=BUCKET, Key=key, Body=body)
                    deadline = started + 60
                    while True:
                        async with client.get(base + key) as resp:
                            if await resp.read() == body:
                                break
                        if time.perf_counter() > deadline:
                            raise TimeoutError(f"update {i} not visible within 60 s")
                        await asyncio.sleep(POLL)
                    seconds.append(time.perf_counter() - started)
                heads, gets = counters.get("s3_head") - heads, counters.get("s3_get") - gets
        finally:
            await runner.cleanup()
    finally:
        moto.terminate()
        moto.wait()
    return {"updates": updates, "p50 ms": round(percentile(seconds, 50) * 1000, 1),
            "p99 ms": round(percentile(seconds, 99) * 1000, 1), "max ms": round(max(seconds) * 1000, 1),
            "mean ms": round(statistics.fmean(seconds) * 1000, 1), "HeadObject": heads, "GetObject": gets}


@dataclass(frozen=True, slots=True)
class Requests:
    head: int = 0
    get: int = 0
    list: int = 0

    @property
    def total(self) -> int:
        return self.head + self.get + self.list


def model(keys: int, ttl: float, events: bool, view_interval: float, change_rate: float, seed: int = 1) -> Requests:
    """One hour of a site whose every key is viewed every `view_interval` seconds (the whole site is cached at
    the start, each entry checked at a random moment within its TTL, so revalidations are spread out)."""
    rng = random.Random(seed)
    windows = Windows(ttl=ttl)
    hour = 3600.0
    version = dict.fromkeys(range(keys), 0)
    entries = {k: Entry(str(k), ObjectMeta(etag='"0"', size=1, last_modified=None), -rng.uniform(0, ttl))
               for k in range(keys)}
    timeline: list[tuple[float, int, str]] = []
    for k in range(keys):
        first = rng.uniform(0, view_interval)
        timeline += [(first + n * view_interval, k, "view") for n in range(int(hour / view_interval) + 1)
                     if first + n * view_interval < hour]
    for k in rng.sample(range(keys), round(keys * change_rate)):
        timeline.append((rng.uniform(0, hour), k, "change"))
    timeline.sort()
    head = get = 0
    lists = math.ceil(keys / 1000) if events else 0  # the sweep at start: one ListObjectsV2 per 1,000 keys
    if events:
        entries = {k: e.checked(e.meta, 0.0) for k, e in entries.items()}  # the sweep confirmed every entry
    for now, k, what in timeline:
        entry = entries[k]
        if what == "change":
            version[k] += 1
            if events:
                # events.py with refresh = true: the key is cached, so one GetObject fetches the new version
                # (service.prefetch), committed as checked now.
                get += 1
                entries[k] = Entry(entry.key, ObjectMeta(f'"{version[k]}"', 1, None), now)
            continue
        action = decide(entry, now, windows)
        if isinstance(action, Serve):
            continue
        assert isinstance(action, Revalidate | Fetch), action
        head += 1  # CachingProxy._revalidate: one HeadObject
        current = f'"{version[k]}"'
        if current != entry.meta.etag:
            get += 1  # changed: the fill's GetObject
        entries[k] = Entry(entry.key, ObjectMeta(current, 1, None), now)
    return Requests(head=head, get=get, list=lists)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--view-interval", type=float, default=60.0)
    parser.add_argument("--change-rate", type=float, default=0.01, help="share of keys changed per hour")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with tempfile.TemporaryDirectory(prefix="cachingproxy-events-") as tmp_name:
        live = await latency(args.updates, Path(tmp_name))
    without = model(args.keys, 300.0, False, args.view_interval, args.change_rate)
    with_events = model(args.keys, 86400.0, True, args.view_interval, args.change_rate)
    changed = round(args.keys * args.change_rate)
    columns = list(live)
    lines = [
        "# S3 event notifications: publish-to-visible latency and S3 requests per hour",
        "",
        f"`.venv/bin/python benchmarks/events.py --updates {args.updates} --keys {args.keys} "
        f"--view-interval {args.view_interval:g} --change-rate {args.change_rate:g}` on {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}",
        "",
        "Publish-to-visible (live: PutObject -> moto S3 -> SQS -> long poll -> refresh GET -> first client GET "
        "that returns the new body; moto in its own process on loopback, client polling every 5 ms):",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + " ---: |" * len(columns),
        "| " + " | ".join(str(live[c]) for c in columns) + " |",
        "",
        f"S3 requests in one hour, {args.keys} keys each viewed every {args.view_interval:g} s, {changed} keys "
        "changed (model over policy.decide, see the script's docstring):",
        "",
        "| set-up | HeadObject | GetObject | ListObjectsV2 | total |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| TTL 300 s, no events | {without.head} | {without.get} | {without.list} | {without.total} |",
        f"| TTL 24 h, events (refresh = true) | {with_events.head} | {with_events.get} | {with_events.list} | "
        f"{with_events.total} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())

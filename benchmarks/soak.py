"""Issue 16: does the proxy's memory grow over a long mixed run? The tree's PSS sampled under steady traffic.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--rate 150] [--clients 4] [--workers 2]

Starts what `benchmarks/run.py` starts (moto, the 30 ms shim, `cachingproxy serve` with `[server] workers = N`,
run.py's corpus of small pages plus a 10 MiB and a 100 MiB download) and sends, paced at about `--rate`
requests/s from `--clients` connections (low, so a shared machine stays usable), a mix of: hot small GETs
(half with a browser's Accept-Encoding, so compressed variants are made and served), conditional GETs that
get 304, HEADs, GETs of keys that do not exist (404), GETs of never-seen keys (cold: each one a fill), the
10 MiB object, and every `--big-every` seconds one client pulling the whole 100 MiB object. Every
`--sample` seconds it sums the PSS of the proxy's processes (supervisor and workers, smaps_rollup), and
of it the anonymous part (Pss_Anon: what the proxy allocated, unmoved by other processes sharing its files).

Prints the PSS per minute, the first minute's and the last minute's mean, and the slope of a least-squares
line through the samples after the first minute (MiB per minute), for PSS and for Pss_Anon: growth that
does not level off shows there. The statuses are checked (200, 304, 404 only; every body's length) and counted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpus_mod  # the same directory: scripts, not a package
import run
from footprint import rollup
from targets import tree_pids

BROWSER = "gzip, deflate, br, zstd"


def seed(client: Any, c: corpus_mod.Corpus, objects: dict[str, tuple[bytes, str]]) -> None:
    """The small pages and the two downloads used here (run.py's second 100 MiB object is left out)."""
    put = client.put_object
    client.create_bucket(Bucket=corpus_mod.BUCKET)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: put(Bucket=corpus_mod.BUCKET, Key=item[0], Body=item[1][0],
                                       ContentType=item[1][1]), objects.items()))
    for salt, key in enumerate((c.big10, c.big100)):
        put(Bucket=corpus_mod.BUCKET, Key=key, Body=random.Random(salt).randbytes(c.sizes[key]),
            ContentType="application/octet-stream")


@dataclass(frozen=True)
class Sample:
    """One look at the proxy's tree, KiB summed over its processes. Pss_Anon is what the proxy allocated
    itself; Pss_File also moves with whatever else maps the same files (the interpreter, the extensions), so a
    neighbour starting or ending shifts Pss but not Pss_Anon."""

    t: float
    pss: int
    anon: int
    rss: int


def tree_sample(root: int, t: float) -> Sample:
    kibs = [rollup(p) for p in tree_pids(root)]
    return Sample(t, *(sum(k.get(f, 0) for k in kibs) for f in ("Pss", "Pss_Anon", "Rss")))


class Mix:
    """The request mix: each call to `one` sends one request chosen by weight and checks its answer."""

    def __init__(self, base: str, c: corpus_mod.Corpus) -> None:
        self.base = base + run.MOUNT
        self.c = c
        self.cold = list(c.cold)
        self.etags: dict[str, str] = {}
        self.statuses: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(16)
        self.kinds = ["hot", "hot_br", "revalidate", "head", "missing", "cold", "big10"]
        self.weights = [42, 30, 10, 6, 6, 3, 2]

    async def one(self, session: aiohttp.ClientSession) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        key = self.rng.choice(self.c.hot)
        headers = {"Accept-Encoding": "identity"}
        method, want = "GET", 200
        if kind == "hot_br":
            headers = {"Accept-Encoding": BROWSER}
        elif kind == "revalidate":
            if key not in self.etags:
                kind = "hot"
            else:
                headers["If-None-Match"] = self.etags[key]
                want = 304
        elif kind == "head":
            method = "HEAD"
        elif kind == "missing":
            key, want = f"missing/{self.rng.getrandbits(64):x}.html", 404
        elif kind == "cold":
            if self.cold:
                key = self.cold.pop()
            else:
                kind = "hot"  # every cold key was used: the rest of the run sends hot ones instead
        elif kind == "big10":
            key = self.c.big10
        async with session.request(method, self.base + key, headers=headers) as resp:
            size = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                size += len(chunk)
            if resp.status != want:
                raise RuntimeError(f"{method} {key} ({kind}): {resp.status}, expected {want}")
            if want == 200 and method == "GET" and "Content-Encoding" not in resp.headers and \
                    size != self.c.sizes[key]:
                raise RuntimeError(f"{key}: {size} bytes, expected {self.c.sizes[key]}")
            if want == 200 and "ETag" in resp.headers and "Content-Encoding" not in resp.headers:
                self.etags[key] = resp.headers["ETag"]
        self.statuses[f"{kind} {resp.status}"] += 1

    async def big(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.base + self.c.big100, headers={"Accept-Encoding": "identity"}) as resp:
            size = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                size += len(chunk)
        if resp.status != 200 or size != self.c.sizes[self.c.big100]:
            raise RuntimeError(f"100 MiB object: {resp.status} with {size} bytes")
        self.statuses["big100 200"] += 1


async def load(mix: Mix, args: argparse.Namespace, until: float) -> None:
    per_client = args.clients / args.rate  # seconds between one client's requests

    async def client(session: aiohttp.ClientSession) -> None:
        next_at = time.monotonic()
        while (now := time.monotonic()) < until:
            if now < next_at:
                await asyncio.sleep(next_at - now)  # pacing, not synchronisation
            next_at += per_client
            await mix.one(session)

    async def big(session: aiohttp.ClientSession) -> None:
        while time.monotonic() + args.big_every < until:
            await asyncio.sleep(args.big_every)
            await mix.big(session)

    timeout = aiohttp.ClientTimeout(total=300)
    # auto_decompress off: compressed bodies are counted as sent, and the client spends no CPU inflating them.
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     auto_decompress=False) as session:
        await asyncio.gather(*(client(session) for _ in range(args.clients)), big(session))


async def sampler(root: int, every: float, until: float, samples: list[Sample]) -> None:
    started = time.monotonic()
    while (now := time.monotonic()) < until:
        samples.append(await asyncio.to_thread(tree_sample, root, now - started))
        await asyncio.sleep(every)


def slope(points: list[tuple[float, int]]) -> float:
    """Least squares, KiB per second."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def report(samples: list[Sample], mix: Mix, args: argparse.Namespace, root_rows: list[str]) -> str:
    minutes: dict[int, list[Sample]] = collections.defaultdict(list)
    for s in samples:
        minutes[int(s.t // 60)].append(s)

    def mib(v: float) -> str:
        return f"{v / 1024:.1f}"

    def per_minute(field: str) -> float:
        return slope([(s.t, getattr(s, field)) for s in samples if s.t >= 60]) * 60 / 1024

    last = max(minutes)
    first_mean, last_mean = (statistics.fmean(s.pss for s in minutes[m]) / 1024 for m in (0, last))
    first_anon, last_anon = (statistics.fmean(s.anon for s in minutes[m]) / 1024 for m in (0, last))
    requests = sum(mix.statuses.values())
    lines = [
        f"`.venv/bin/python benchmarks/soak.py --minutes {args.minutes:g} --rate {args.rate:g} --clients "
        f"{args.clients} --workers {args.workers} --big-every {args.big_every:g} --cold {args.cold}` on "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"{requests:,} requests ({requests / (args.minutes * 60):.0f}/s): "
        + ", ".join(f"{k} x{v}" for k, v in sorted(mix.statuses.items())),
        "",
        "| minute | samples | tree PSS MiB, mean | min | max | of it Pss_Anon, mean |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {m + 1} | {len(v)} | {mib(statistics.fmean(s.pss for s in v))} | {mib(min(s.pss for s in v))} | "
          f"{mib(max(s.pss for s in v))} | {mib(statistics.fmean(s.anon for s in v))} |"
          for m, v in sorted(minutes.items())),
        "",
        f"first minute {first_mean:.1f} MiB, last minute {last_mean:.1f} MiB ({last_mean - first_mean:+.1f}); "
        f"slope after the first minute {per_minute('pss'):+.2f} MiB/min; peak {mib(max(s.pss for s in samples))} "
        f"(RSS sum peak {mib(max(s.rss for s in samples))})",
        f"Pss_Anon: first minute {first_anon:.1f} MiB, last minute {last_anon:.1f} ({last_anon - first_anon:+.1f}); "
        f"slope after the first minute {per_minute('anon'):+.2f} MiB/min",
        "",
        "At the end, per process (smaps_rollup, MiB):",
        "",
        *root_rows,
    ]
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=150.0, help="requests/s over all clients (paced)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--big-every", type=float, default=30.0, help="seconds between 100 MiB pulls")
    parser.add_argument("--sample", type=float, default=3.0, help="seconds between PSS samples")
    parser.add_argument("--cold", type=int, default=3000, help="never-seen small keys available")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    procs: list[run.Proc] = []
    with tempfile.TemporaryDirectory(prefix="cachingproxy-soak-") as tmp_name, run.running(procs):
        tmp = Path(tmp_name)
        run.log("starting moto and seeding")
        c, objects = corpus_mod.make_corpus(hot=300, cold=args.cold)
        shim_url = run.start_seeded(tmp, procs, c, objects, seed)
        t = run.Target("workers", f"workers x{args.workers}")
        run.start_target(t, tmp, shim_url, int(shim_url.rsplit(":", 1)[1]), args.workers)
        assert t.proc is not None
        procs.append(t.proc)
        mix = Mix(t.base, c)
        run.log(f"proxy up (pid {t.proc.pid}); {args.minutes:g} minutes at ~{args.rate:g} requests/s")
        until = time.monotonic() + args.minutes * 60
        samples: list[Sample] = []
        await asyncio.gather(load(mix, args, until), sampler(t.proc.pid, args.sample, until, samples))
        rows = ["| pid | " + " | ".join(("Rss", "Pss", "Private_Dirty", "Shared_Dirty")) + " |",
                "| --- | ---: | ---: | ---: | ---: |"]
        for pid in tree_pids(t.proc.pid):
            kib = rollup(pid)
            who = "supervisor" if pid == t.proc.pid else "worker"
            rows.append(f"| {pid} {who} | " + " | ".join(f"{kib.get(f, 0) / 1024:.1f}" for f in
                                                          ("Rss", "Pss", "Private_Dirty", "Shared_Dirty")) + " |")
        text = report(samples, mix, args, rows)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

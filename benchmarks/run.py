"""The proxy beside nginx proxy_cache and a direct fetch, on one machine, in one run (issue 6).

    make bench                                      # = .venv/bin/python benchmarks/run.py
    .venv/bin/python benchmarks/run.py --targets nginx,serve,workers,sites10,hello --workers 2
    .venv/bin/python benchmarks/run.py --profile workers   # py-spy on a hot small-object run instead
    .venv/bin/python benchmarks/run.py --profile workers --profile-encoding br   # ... of compressed hits

Starts, on 127.0.0.1 only: moto's server (its own process) holding a generated docs corpus, a shim adding
30 ms to every S3 request and counting them, the proxy as `cachingproxy serve` with `[server] workers = N`
(and, with `serve` in --targets, with one worker), nginx with proxy_cache in front of the same shim, and
`benchmarks/hello.py` (a bare aiohttp app on the same workers and loop: the Python ceiling, hot small
objects only). Then measures, with wrk for load: hot small-object requests/s with p50/p99 and the ratio to
`hello` and to nginx, the same with `Accept-Encoding: br` (compressed hits; nginx gzips, it has no brotli) and
its ratio to identity hits, hot 10 MB throughput, cold view latency (median over 60 never-seen objects) and cold
100 MB time against a direct fetch from the shim, S3 requests per 1000 hot views, and the peak PSS (and RSS) of
each server's process tree while 32 clients pull a 100 MB object (cold at first); and the sample site's bytes per
first view by coding (benchmarks/compression.py). Prints one table and writes it with the machine's facts to
benchmarks/results/latest.md. About 3 minutes; every phase is bounded, and everything started is stopped.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import compression
import corpus as corpus_mod
from measure import Fetcher, WrkResult, encodings, fetch_all, run_wrk
from targets import (
    HOST,
    Proc,
    TreeMemory,
    free_port,
    nginx_conf,
    proxy_toml,
    start,
    stop,
    tree_cpu_seconds,
    wait_http,
    which,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PY = sys.executable
SHIM_DELAY = 0.030
MOUNT = "/docs/"
# The hot compressed-hit run: what each server is asked for and must answer in. nginx has no brotli (targets.py),
# so it is asked for gzip, which it makes on every response; the proxy answers from the variant it stored.
CODED = {"workers": "br", "nginx": "gzip"}
VARIANTS_WAIT = 90.0  # seconds for background compression to finish after the first fills


@dataclass
class Target:
    name: str  # "nginx", "serve", "workers", "hello"
    label: str  # column heading
    port: int = 0
    proc: Proc | None = None
    base: str = ""  # URL prefix the object keys are appended to
    cold_ms: list[float] = field(default_factory=list)
    cold_big_s: float = 0.0
    cold_big_peak_mib: float = 0.0
    hot: WrkResult | None = None
    hot_coded: WrkResult | None = None  # the same run with Accept-Encoding: CODED[name]
    variants_wait_s: float = 0.0  # from the hot keys' first fills until their variants were served
    coded_ratios: list[float] = field(default_factory=list)  # compressed / identity req/s, round by round
    cpu_us: float = 0.0  # the server's user + system CPU per hot small hit, identity
    cpu_us_coded: float = 0.0  # the same for compressed hits
    s3_per_1000: float = 0.0
    big10: WrkResult | None = None
    fanout: WrkResult | None = None
    fanout_rss_mib: float = 0.0
    fanout_pss_mib: float = 0.0
    fanout_s3_gets: int = 0
    notes: list[str] = field(default_factory=list)


class Budget(Exception):
    """The whole run exceeded its time budget."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Budget("time budget exceeded")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shim_counts(shim_url: str, reset: bool = False) -> collections.Counter[str]:
    req = urllib.request.Request(shim_url + ("/__shim__/reset" if reset else "/__shim__/counts"),
                                 method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return collections.Counter(json.load(resp))


def s3_requests(counts: collections.Counter[str]) -> int:
    return sum(counts.values())


def env_for_proxy() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


# -- start everything ------------------------------------------------------------------------------------


def start_moto(tmp: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = start("moto", [PY, "-m", "moto.server", "-H", HOST, "-p", str(port)], tmp)
    url = f"http://{HOST}:{port}"
    wait_http(url + "/moto-api/", proc)
    return proc, url


def start_shim(tmp: Path, moto_url: str) -> tuple[Proc, str]:
    port = free_port()
    proc = start("shim", [PY, str(HERE / "shim.py"), "--port", str(port), "--upstream", moto_url,
                          "--delay", str(SHIM_DELAY)], tmp)
    url = f"http://{HOST}:{port}"
    wait_http(url + "/__shim__/counts", proc)
    return proc, url


def start_seeded(tmp: Path, procs: list[Proc], c: corpus_mod.Corpus, objects: dict[str, tuple[bytes, str]],
                 seed: Callable[[Any, corpus_mod.Corpus, dict[str, tuple[bytes, str]]], None] = corpus_mod.seed
                 ) -> str:
    """moto holding the corpus (put there by `seed`) and the shim in front of it, both added to `procs`; the
    shim's URL."""
    moto, moto_url = start_moto(tmp)
    procs.append(moto)
    import boto3  # the test extra; only the seeding needs it

    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    seed(client, c, objects)
    shim, shim_url = start_shim(tmp, moto_url)
    procs.append(shim)
    return shim_url


def start_target(t: Target, tmp: Path, shim_url: str, shim_port: int, workers: int) -> None:
    t.port = free_port()
    t.base = f"http://{HOST}:{t.port}"
    home = tmp / t.name
    home.mkdir()
    if t.name == "nginx":
        nginx = which("nginx")
        assert nginx is not None
        (home / "nginx.conf").write_text(nginx_conf(home, t.port, shim_port, corpus_mod.BUCKET))
        t.proc = start(t.name, [nginx, "-p", str(home), "-c", str(home / "nginx.conf"), "-e",
                                str(home / "error.log")], tmp)
    elif t.name == "hello":
        t.proc = start(t.name, [PY, str(HERE / "hello.py"), "--port", str(t.port), "--workers", str(workers)], tmp)
    else:
        toml = home / "bench.toml"
        toml.write_text(proxy_toml(t.port, shim_url, corpus_mod.BUCKET, home / "cache",
                                   1 if t.name == "serve" else workers, sites=10 if t.name == "sites10" else 1))
        argv = [PY, "-m", "cachingproxy", "serve", "--config", str(toml)]
        t.proc = start(t.name, argv, tmp, env=env_for_proxy())
    # 404 for the mount root is fine: anything that answers HTTP is up.
    wait_http(t.base + MOUNT + "__ready__", t.proc)


# -- phases ----------------------------------------------------------------------------------------------


def cold_views(targets: list[Target], direct: Target, c: corpus_mod.Corpus) -> None:
    """Each never-seen key once per server, interleaved so that noise hits every column alike."""
    fetchers = {t.name: Fetcher(HOST, t.port) for t in [direct, *targets]}
    try:
        for key in c.cold:
            for t in [direct, *targets]:
                status, size, seconds = fetchers[t.name].get(url_path(t, key))
                check(t, key, status, size, c)
                t.cold_ms.append(seconds * 1000)
    finally:
        for f in fetchers.values():
            f.close()


def url_path(t: Target, key: str) -> str:
    return (f"/{corpus_mod.BUCKET}/" if t.name == "direct" else MOUNT) + key


def check(t: Target, key: str, status: int, size: int, c: corpus_mod.Corpus) -> None:
    if status != 200 or size != c.sizes[key]:
        raise RuntimeError(f"{t.label}: GET {key} gave {status} with {size} bytes, expected 200 with {c.sizes[key]}")


def cold_big(targets: list[Target], direct: Target, c: corpus_mod.Corpus) -> None:
    """Time to last byte of the 100 MB object, once per server, with a direct fetch before each."""
    direct_times = []
    for t in targets:
        for who in (direct, t):
            f = Fetcher(HOST, who.port)
            try:
                if who.proc is not None:
                    with TreeMemory(who.proc.pid) as mem:
                        status, size, seconds = f.get(url_path(who, c.big100))
                    who.cold_big_peak_mib = mem.peak_rss_kib / 1024
                else:
                    status, size, seconds = f.get(url_path(who, c.big100))
            finally:
                f.close()
            check(who, c.big100, status, size, c)
            if who is direct:
                direct_times.append(seconds)
            else:
                who.cold_big_s = seconds
    direct.cold_big_s = statistics.median(direct_times)


def warm(t: Target, c: corpus_mod.Corpus, tmp: Path) -> None:
    statuses = fetch_all(HOST, t.port, [MOUNT + k for k in (*c.hot, c.big10)])
    if set(statuses) != {200}:
        raise RuntimeError(f"{t.label}: warm-up statuses {collections.Counter(statuses)}")
    run_wrk(t.base, [MOUNT + k for k in c.hot], tmp, seconds=2, connections=64)  # settle: pools, page cache
    coding = CODED.get(t.name)
    if coding is not None:
        run_wrk(t.base, [MOUNT + k for k in c.hot], tmp, seconds=1, connections=64,
                headers={"Accept-Encoding": coding})


def wait_for_variants(t: Target, keys: tuple[str, ...], deadline: float, coding: str = "br") -> float:
    """Until every key answers `Accept-Encoding: <coding>` in that coding, from every worker; the seconds taken.

    The proxy makes a version's variants in the background after its first fill, and a worker serves identity
    bytes until it knows they exist: measuring before that would time identity hits, or hits racing the
    compressor for the same two cores. Condition, not a sleep: two passes in a row in which each of 8 new
    connections (SO_REUSEPORT spreads them over the workers) got the coding for every key. Past `deadline` the run
    goes on with a note, since a missing row would hide the problem the row is there to show.
    """
    began = time.monotonic()
    paths = [MOUNT + k for k in keys]
    clean = 0
    while clean < 2:
        seen = encodings(HOST, t.port, paths, {"Accept-Encoding": coding}, concurrency=8)
        other = collections.Counter(code for codes in seen.values() for code in codes if code != coding)
        if any(code.startswith("status") for code in other):
            raise RuntimeError(f"{t.label}: {coding} requests answered {dict(other)}")
        clean = clean + 1 if not other else 0
        if clean < 2 and time.monotonic() > deadline:
            t.notes.append(f"variants not all made within {VARIANTS_WAIT:.0f} s (last pass: {dict(other)} "
                           f"besides {coding})")
            break
        if other:
            time.sleep(0.5)  # polling interval of the condition above, not a stand-in for it
    return time.monotonic() - began


def check_coding(t: Target, c: corpus_mod.Corpus) -> None:
    """nginx compresses per response, so nothing to wait for: one look that its gzip is really on."""
    coding = CODED[t.name]
    seen = encodings(HOST, t.port, [MOUNT + k for k in c.hot[:20]], {"Accept-Encoding": coding}, concurrency=1)
    wrong = collections.Counter(code for codes in seen.values() for code in codes if code != coding)
    if wrong:
        raise RuntimeError(f"{t.label}: asked for {coding}, answered {dict(wrong)}")


def _merge(runs: list[WrkResult]) -> WrkResult:
    """Rounds of one target as one result: totals for rates, the median round for latency percentiles."""
    return WrkResult(requests=sum(r.requests for r in runs), seconds=sum(r.seconds for r in runs),
                     bytes=sum(r.bytes for r in runs), errors=sum(r.errors for r in runs),
                     p50_ms=statistics.median(r.p50_ms for r in runs),
                     p99_ms=statistics.median(r.p99_ms for r in runs))


# Issue 16 states its hot-hit targets (ratio to the bare handler, p99 under 10 ms) at 32 connections; the rows
# were measured at 64 before 2026-12-03.
HOT_CONNECTIONS = 32


def hot_rounds(targets: list[Target], c: corpus_mod.Corpus, shim_url: str, tmp: Path, rounds: int,
               seconds: float) -> None:
    """Hot small objects and the hot 10 MB object, in rounds that alternate the servers.

    Other work on the machine comes and goes; alternating short rounds spreads it over every column
    instead of penalising whichever server happened to run during a burst, so the ratios stay meaningful.
    A server in CODED also runs the same small-object load with Accept-Encoding right beside its identity run,
    first or second by turns, so the compressed-to-identity ratio compares neighbours in time.
    """
    small: dict[str, list[WrkResult]] = collections.defaultdict(list)
    coded: dict[str, list[WrkResult]] = collections.defaultdict(list)
    cpu: dict[tuple[str, str | None], float] = collections.defaultdict(float)  # CPU seconds by (target, coding)
    big: dict[str, list[WrkResult]] = collections.defaultdict(list)
    s3: collections.Counter[str] = collections.Counter()
    hot = [MOUNT + k for k in c.hot]
    for r in range(rounds):
        for t in targets:
            shim_counts(shim_url, reset=True)
            coding = CODED.get(t.name)
            order = [None] if coding is None else [None, coding] if r % 2 == 0 else [coding, None]
            for accept in order:
                assert t.proc is not None
                cpu_before = tree_cpu_seconds(t.proc.pid)
                if accept is None:
                    small[t.name].append(run_wrk(t.base, hot, tmp, seconds=seconds, connections=HOT_CONNECTIONS))
                else:
                    coded[t.name].append(run_wrk(t.base, hot, tmp, seconds=seconds, connections=HOT_CONNECTIONS,
                                                 headers={"Accept-Encoding": accept}))
                cpu[t.name, accept] += tree_cpu_seconds(t.proc.pid) - cpu_before
            s3[t.name] += s3_requests(shim_counts(shim_url))
            line = (f"  round {r + 1}/{rounds} {t.label}: {small[t.name][-1].rps:,.0f} req/s, "
                    f"p99 {small[t.name][-1].p99_ms:.2f} ms")
            if coding is not None:
                line += (f"; {coding} {coded[t.name][-1].rps:,.0f} req/s "
                         f"({coded[t.name][-1].rps / max(1.0, small[t.name][-1].rps):.2f}x), "
                         f"p99 {coded[t.name][-1].p99_ms:.2f} ms")
            if t.name != "hello":  # the ceiling app answers 16 KB for every path
                big[t.name].append(run_wrk(t.base, [MOUNT + c.big10], tmp, seconds=max(2.0, seconds / 2),
                                           connections=8, timeout=30))
                line += f"; 10 MB {big[t.name][-1].mb_per_s:,.0f} MB/s"
            log(line)
    for t in targets:
        t.hot = _merge(small[t.name])
        t.hot_coded = _merge(coded[t.name]) if coded[t.name] else None
        t.coded_ratios = [k.rps / i.rps for k, i in zip(coded[t.name], small[t.name], strict=False) if i.rps]
        t.cpu_us = 1e6 * cpu[t.name, None] / max(1, t.hot.requests)
        if t.hot_coded is not None:
            t.cpu_us_coded = 1e6 * cpu[t.name, CODED[t.name]] / max(1, t.hot_coded.requests)
        t.big10 = _merge(big[t.name]) if big[t.name] else None
        t.s3_per_1000 = 1000 * s3[t.name] / max(1, t.hot.requests + (t.hot_coded.requests if t.hot_coded else 0))
        for name, result in (("hot small", t.hot), ("hot compressed", t.hot_coded), ("hot 10 MB", t.big10)):
            if result is not None and result.errors:
                t.notes.append(f"{name}: {result.errors} wrk errors (non-2xx, timeouts or resets)")


def fanout(t: Target, c: corpus_mod.Corpus, shim_url: str, tmp: Path, seconds: float) -> None:
    """32 clients pull a 100 MB object that starts cold; the peak memory of the server's process tree."""
    assert t.proc is not None
    shim_counts(shim_url, reset=True)
    with TreeMemory(t.proc.pid) as mem:
        t.fanout = run_wrk(t.base, [MOUNT + c.big100_fanout], tmp, seconds=seconds, connections=32, timeout=60)
    t.fanout_s3_gets = shim_counts(shim_url)["GET"]
    t.fanout_rss_mib, t.fanout_pss_mib = mem.peak_rss_kib / 1024, mem.peak_pss_kib / 1024
    log(f"  {t.label}: 32 x 100 MB: peak RSS {t.fanout_rss_mib:.0f} MiB (PSS {t.fanout_pss_mib:.0f}), "
        f"{t.fanout.mb_per_s:,.0f} MB/s, S3 GETs {t.fanout_s3_gets}, errors {t.fanout.errors}")
    if t.fanout.errors:
        t.notes.append(f"32 x 100 MB: {t.fanout.errors} wrk errors (non-2xx, timeouts or resets)")


def load_rounds(args: argparse.Namespace) -> tuple[int, float]:
    """(rounds, seconds per wrk run) of the hot phases."""
    return (1, 3.0) if args.quick else (args.rounds, 4.0)


# -- report ----------------------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def _dist(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "?")
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- cores: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {cpu}; wrk shares them with the servers",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, aiohttp {_dist('aiohttp')}, aiobotocore {_dist('aiobotocore')}, "
        f"diskcache {_dist('diskcache')}, uvloop {_dist('uvloop')}, moto {_dist('moto')}",
        f"- {_version([which('nginx') or 'nginx', '-v'])}; {_version(['wrk', '--version']).split(' [')[0]}",
    ]


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def table(targets: list[Target], direct: Target, view: compression.FirstView | None = None) -> str:
    nginx = next((t for t in targets if t.name == "nginx"), None)
    hello = next((t for t in targets if t.name == "hello"), None)
    cols = [direct, *targets]
    proxies = {"serve", "workers", "sites10"}
    rows: list[tuple[str, str, list[str]]] = []

    def cell(t: Target, text: str, ratio: str = "") -> str:
        return f"{text} ({ratio})" if ratio else text

    def vs_nginx(t: Target, value: float, base: float | None) -> str:
        return "" if nginx is None or t is nginx or base is None else _ratio(value, base) + " nginx"

    def hot_cell(t: Target) -> str:
        return "-" if t.hot is None else f"{t.hot.rps:,.0f}"

    def hot_ratio_cell(t: Target) -> str:
        # The issue-16 target is on the bare handler; nginx beside it for scale. Both from this run.
        if t.hot is None or t.name not in proxies:
            return "-"
        bits = [_ratio(t.hot.rps, hello.hot.rps) + " hello" if hello and hello.hot else "",
                _ratio(t.hot.rps, nginx.hot.rps) + " nginx" if nginx and nginx.hot else ""]
        return " / ".join(b for b in bits if b) or "-"

    def lat_cell(t: Target) -> str:
        return "-" if t.hot is None else f"{t.hot.p50_ms:.2f} / {t.hot.p99_ms:.2f}"

    def coded_cell(t: Target) -> str:
        if t.hot_coded is None:
            return "-"
        base = nginx.hot_coded.rps if nginx and nginx.hot_coded else None
        return cell(t, f"{t.hot_coded.rps:,.0f} {CODED[t.name]}", vs_nginx(t, t.hot_coded.rps, base))

    def coded_ratio_cell(t: Target) -> str:
        # Both: the rate is the target's own measure, CPU per hit the one that other load on the cores hardly moves.
        if t.hot_coded is None or t.hot is None:
            return "-"
        cpu = f" / {_ratio(t.cpu_us_coded, t.cpu_us)}" if t.cpu_us and t.cpu_us_coded else ""
        return _ratio(t.hot_coded.rps, t.hot.rps) + cpu

    def coded_lat_cell(t: Target) -> str:
        return "-" if t.hot_coded is None else f"{t.hot_coded.p50_ms:.2f} / {t.hot_coded.p99_ms:.2f}"

    def cpu_cell(t: Target) -> str:
        if not t.cpu_us:
            return "-"
        return f"{t.cpu_us:.0f}" + (f" / {t.cpu_us_coded:.0f} {CODED[t.name]}" if t.cpu_us_coded else "")

    def big10_cell(t: Target) -> str:
        if t.big10 is None:
            return "-"
        base = nginx.big10.mb_per_s if nginx and nginx.big10 else None
        return cell(t, f"{t.big10.mb_per_s:,.0f}", vs_nginx(t, t.big10.mb_per_s, base))

    d_cold = statistics.median(direct.cold_ms) if direct.cold_ms else 0.0

    def cold_cell(t: Target) -> str:
        if not t.cold_ms:
            return "-"
        med = statistics.median(t.cold_ms)
        return cell(t, f"{med:.1f}", "" if t is direct else _ratio(med, d_cold) + " direct")

    def big_cell(t: Target) -> str:
        if not t.cold_big_s:
            return "-"
        ratio = "" if t is direct else _ratio(t.cold_big_s, direct.cold_big_s) + " direct"
        return cell(t, f"{t.cold_big_s:.2f}", ratio)

    def s3_cell(t: Target) -> str:
        return "-" if t.hot is None or t.name == "hello" else f"{t.s3_per_1000:.2f}"

    def pss_cell(t: Target) -> str:
        return "-" if t.fanout is None else f"{t.fanout_pss_mib:.0f} (RSS {t.fanout_rss_mib:.0f})"

    def view_cell(t: Target, column: str) -> str:
        """First-view bytes as each server would send them: S3 sends identity, nginx gzip -6, the proxy its
        stored variant. Computed by compression.first_view() with the proxy's own codec, not over the wire."""
        if view is None or t.name == "hello" or (t is direct and column != "identity"):
            return "-"
        if t is nginx or t is direct:
            size = view.totals["gzip -6 (nginx)" if column != "identity" else "identity"]
            return f"{size:,}" + (" (gzip)" if t is nginx and column == "br" else "")
        size = view.totals[column]
        base = view.totals["gzip -6 (nginx)"] if nginx and column != "identity" else None
        return cell(t, f"{size:,}", "" if base is None else _ratio(size, base) + " nginx")

    rows = [
        ("hot small objects, requests/s", "see next row", [hot_cell(t) for t in cols]),
        (f"hot small objects, ratio to {hello.label if hello else 'hello'} / to nginx (same run)", ">= 0.8x hello",
         [hot_ratio_cell(t) for t in cols]),
        (f"hot small objects, p50 / p99 ms ({HOT_CONNECTIONS} connections)", "p99 < 10", [lat_cell(t) for t in cols]),
        ("hot compressed hits, requests/s (Accept-Encoding: br; nginx has no br, asked for gzip -6)", "-",
         [coded_cell(t) for t in cols]),
        ("hot compressed hits vs identity hits (same run): req/s / CPU per hit", ">= 0.9x / <= 1.1x (10 %)",
         [coded_ratio_cell(t) for t in cols]),
        (f"hot compressed hits, p50 / p99 ms ({HOT_CONNECTIONS} connections)", "p99 < 10",
         [coded_lat_cell(t) for t in cols]),
        ("hot hits, server CPU µs per hit (user + sys): identity / compressed", "-", [cpu_cell(t) for t in cols]),
        ("hot 10 MB object, MB/s (8 clients)", ">= 0.8x nginx", [big10_cell(t) for t in cols]),
        ("cold view, median ms (60 keys)", "<= 1.1x direct", [cold_cell(t) for t in cols]),
        ("cold 100 MB, seconds to last byte", "<= 1.2x direct", [big_cell(t) for t in cols]),
        ("S3 requests per 1000 hot views", "0", [s3_cell(t) for t in cols]),
        ("peak PSS MiB of the process tree, 32 clients x 100 MB (RSS sum)", "<= 120 (2 workers)",
         [pss_cell(t) for t in cols]),
        ("sample site first view, bytes: identity", "-", [view_cell(t, "identity") for t in cols]),
        ("sample site first view, bytes: gzip (nginx: level 6)", "<= nginx", [view_cell(t, "gzip") for t in cols]),
        ("sample site first view, bytes: br (nginx: gzip -6)", "< nginx", [view_cell(t, "br") for t in cols]),
    ]
    head = "| metric | target | " + " | ".join(t.label for t in cols) + " |"
    sep = "| --- | --- | " + " | ".join("---:" for _ in cols) + " |"
    lines = [head, sep] + [f"| {m} | {goal} | " + " | ".join(cells) + " |" for m, goal, cells in rows]
    return "\n".join(lines)


def details(targets: list[Target]) -> list[str]:
    out = []
    for t in targets:
        if t.name == "hello":
            continue
        bits = [f"S3 GETs while 32 clients pulled the cold 100 MB object: {t.fanout_s3_gets}",
                f"peak RSS during the single cold 100 MB fetch: {t.cold_big_peak_mib:.0f} MiB"]
        if t.variants_wait_s:
            bits.append(f"hot keys' br variants served by every worker {t.variants_wait_s:.1f} s after warm-up")
        if t.hot is not None and t.hot_coded is not None:
            bits.append(f"bytes per hot response (head and body): identity {t.hot.bytes_per_request:,.0f}, "
                        f"{CODED[t.name]} {t.hot_coded.bytes_per_request:,.0f}")
            # Round by round: how much of the ratio in the table is the machine's noise.
            bits.append(f"{CODED[t.name]} / identity req/s by round: "
                        + ", ".join(f"{r:.2f}x" for r in t.coded_ratios))
        if t.fanout is not None:
            bits.append(f"32-client 100 MB throughput {t.fanout.mb_per_s:,.0f} MB/s")
        out.append(f"- {t.label}: " + "; ".join(bits + t.notes))
    return out


def report(targets: list[Target], direct: Target, args: argparse.Namespace, elapsed: float,
           view: compression.FirstView) -> str:
    rounds, seconds = load_rounds(args)
    cmd = "make bench" if sys.argv[1:] in ([], ["--no-setup"]) else "python benchmarks/run.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "# Benchmark: cachingproxy beside nginx proxy_cache and a direct fetch",
        "",
        f"Command: `{cmd}` ({elapsed:.0f} s). Loopback only; the shim adds {SHIM_DELAY * 1000:.0f} ms to every "
        "S3 request. Ratios in parentheses.",
        "",
        table(targets, direct, view),
        "",
        "Columns: `direct` = GET straight from the shim (S3 + WAN latency, no cache); `nginx` = proxy_cache + "
        "proxy_cache_lock + proxy_cache_revalidate + sendfile, worker_processes auto; `serve x1` = `python -m "
        "cachingproxy serve` with `[server] workers = 1` (with `--targets ...,serve`); `workers xN` = the same with "
        "N; `10 sites xN` = the same with nine decoy [[sites]] routed before the real one; `hello xN` = "
        "benchmarks/hello.py, a bare aiohttp app answering 16 KB from memory on the same workers and loop (the "
        "Python ceiling). Event loop: uvloop when installed. "
        f"Hot small = wrk -t2 -c{HOT_CONNECTIONS} over {args.hot} objects of 2-30 KB (HTML, CSS, JS), "
        "hot 10 MB = wrk -t2 -c8, "
        f"both in {rounds} round{'s' if rounds > 1 else ''} of {seconds:.0f} s alternating the servers (rates over "
        "all rounds, latency percentiles of the median round). Hot compressed hits = the hot small run again, "
        "beside it in each round, with `-H 'Accept-Encoding: br'` (nginx, which has no brotli, with gzip: `gzip on; "
        "gzip_comp_level 6`, compressing every response), timed only once every hot key answers br from every "
        "worker. CPU per hit = user + system time of the server's process tree over each wrk run, divided by "
        "its requests (wrk's own CPU not included). Memory: PSS "
        "(shared pages split between the processes sharing them, so forked workers are not counted twice) and "
        "RSS summed over the server's process tree, sampled every 20 ms from /proc. First view = the sample "
        "site's index.html with its CSS, JS, SVG and PNG (benchmarks/compression.py, with the proxy's codec and "
        "levels; nginx's gzip -6 computed the same way; files under 1 KiB and images stay identity).",
        "",
        *details(targets),
        "",
        "Machine:",
        "",
        *machine_facts(),
        "",
    ])


# -- main ------------------------------------------------------------------------------------------------


@contextmanager
def running(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            code = stop(p)
            if p.name in ("serve", "workers", "sites10") and code not in (0, None):
                print(f"  note: {p.name} exited {code} after SIGTERM (log: {p.log})", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # serve (one worker) is not in the default: no target is stated on it, and it would push make bench past
    # 3 minutes now that the hot phase also times compressed hits.
    parser.add_argument("--targets", default="nginx,workers,sites10,hello",
                        help="comma list of nginx, serve (one worker), workers, sites10 (workers with a "
                             "ten-site config), hello")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--hot", type=int, default=300, help="number of hot small objects")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the hot phases")
    parser.add_argument("--quick", action="store_true", help="shorter load phases (a smoke run)")
    parser.add_argument("--budget", type=float, default=420, help="abort after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.md")
    parser.add_argument("--no-setup", action="store_true", help="do not try to install nginx and wrk")
    parser.add_argument("--profile", metavar="TARGET", choices=("serve", "workers"),
                        help="instead of the table: py-spy over a hot small-object run of TARGET")
    parser.add_argument("--profile-seconds", type=float, default=15)
    parser.add_argument("--profile-encoding", metavar="CODING", choices=("br", "zstd", "gzip"),
                        help="profile compressed hits: every request with Accept-Encoding: CODING, measured "
                             "once every hot key answers in it")
    args = parser.parse_args()

    if not args.no_setup:
        subprocess.run(["sh", str(HERE / "setup.sh")], check=False, timeout=600)
    if which("wrk") is None:
        print("benchmarks: wrk is required (benchmarks/setup.sh installs it)", file=sys.stderr)
        return 2
    names = [args.profile] if args.profile else [n.strip() for n in args.targets.split(",") if n.strip()]
    if "nginx" in names and which("nginx") is None:
        print("benchmarks: nginx not installed: running without the reference column", file=sys.stderr)
        names.remove("nginx")
    labels = {"nginx": "nginx", "serve": "serve x1", "workers": f"workers x{args.workers}",
              "sites10": f"10 sites x{args.workers}",
              "hello": f"hello x{args.workers}"}
    targets = [Target(n, labels[n]) for n in names]
    direct = Target("direct", "direct")

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(args.budget))
    began = time.monotonic()
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="cachingproxy-bench-") as tmp_name, running(procs):
        tmp = Path(tmp_name)
        log("starting moto and seeding the corpus")
        c, objects = corpus_mod.make_corpus(hot=args.hot)
        shim_url = start_seeded(tmp, procs, c, objects)
        direct.port = int(shim_url.rsplit(":", 1)[1])
        for t in targets:
            start_target(t, tmp, shim_url, direct.port, args.workers)
            assert t.proc is not None
            procs.append(t.proc)
        log("servers up: " + ", ".join(f"{t.label} :{t.port}" for t in targets))
        if args.profile:
            return profile(targets[0], c, tmp, args.profile_seconds, args.profile_encoding)
        proxies = [t for t in targets if t.name != "hello"]  # the ceiling app only takes the hot small phase
        log(f"cold views: {len(c.cold)} keys x {len(proxies) + 1} servers")
        cold_views(proxies, direct, c)
        # The cold keys' variants are being made in the background: let that finish before timing the 100 MB
        # object, so it does not share the two cores with a compressor.
        for t in proxies:
            if t.name != "nginx":
                wait_for_variants(t, c.cold, time.monotonic() + VARIANTS_WAIT)
        log("cold 100 MB")
        cold_big(proxies, direct, c)
        log("warming")
        for t in proxies:
            warm(t, c, tmp)
        for t in proxies:
            if t.name == "nginx":
                check_coding(t, c)
            else:
                began_wait = time.monotonic()
                t.variants_wait_s = wait_for_variants(t, c.hot, began_wait + VARIANTS_WAIT)
                log(f"  {t.label}: br variants of {len(c.hot)} hot keys served by every worker after "
                    f"{t.variants_wait_s:.1f} s")
        rounds, seconds = load_rounds(args)
        log(f"hot small and 10 MB objects: {rounds} rounds alternating the servers")
        hot_rounds(targets, c, shim_url, tmp, rounds, seconds)
        log("32 clients x 100 MB, cold at first")
        for t in proxies:
            fanout(t, c, shim_url, tmp, 5.0 if args.quick else 8.0)
        signal.alarm(0)
        text = report(targets, direct, args, time.monotonic() - began, compression.first_view())
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out.relative_to(HERE.parent) if args.out.is_relative_to(HERE.parent) else args.out}")
    return 0


# -- profile ---------------------------------------------------------------------------------------------


def profile(t: Target, c: corpus_mod.Corpus, tmp: Path, seconds: float, coding: str | None = None) -> int:
    """py-spy (sampling, all threads and worker processes) over a hot small-object wrk run; a summary file.
    With `coding`, every request asks for it, once every hot key is answered in it (compressed hits)."""
    pyspy = which("py-spy") or str(Path(PY).with_name("py-spy"))
    if not Path(pyspy).exists():
        print("benchmarks: `pip install py-spy` into the venv for --profile", file=sys.stderr)
        return 2
    assert t.proc is not None
    fetch_all(HOST, t.port, [MOUNT + k for k in c.hot])
    headers = {"Accept-Encoding": coding} if coding else None
    # Identity hits too: until the variants the first fills started are made, a compressor thread shares the
    # cores with the hits, and its samples (variants.compress, put_variant) land in a profile of hits.
    waited = wait_for_variants(t, c.hot, time.monotonic() + VARIANTS_WAIT, coding or "br")
    log(f"  {coding or 'br'} variants of {len(c.hot)} hot keys served by every worker after {waited:.1f} s")
    raw = tmp / "profile.txt"
    spy = subprocess.Popen([pyspy, "record", "--pid", str(t.proc.pid), "--subprocesses", "--threads",
                            "--duration", str(int(seconds) + 2), "--rate", "250", "--format", "raw",
                            "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)
    result = run_wrk(t.base, [MOUNT + k for k in c.hot], tmp, seconds=seconds, connections=64, headers=headers)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not raw.exists():
        print(f"py-spy failed: {err.decode(errors='replace')}", file=sys.stderr)
        return 1
    out = RESULTS / f"profile-{t.name}{'-' + coding if coding else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summarise(raw.read_text(), t, result, seconds, coding))
    print(out.read_text())
    return 0


def summarise(raw: str, t: Target, result: WrkResult, seconds: float, coding: str | None = None) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        code = [_short(f) for f in frames if not f.startswith(("process ", "thread "))]
        if not code:
            continue
        if code[-1] in IDLE_LEAVES:
            idle += n
            continue
        total += n
        threads[_thread_kind(code)] += n
        own[code[-1]] += n
        for name in set(code):
            incl[name] += n
    if not total:
        return "no samples\n"

    def top(counter: collections.Counter[str], k: int) -> list[str]:
        return [f"| {100 * n / total:5.1f}% | `{name}` |" for name, n in counter.most_common(k)]

    return "\n".join([
        f"# py-spy: {t.label}, hot small objects" + (f", Accept-Encoding: {coding}" if coding else ""),
        "",
        f"wrk -t2 -c64 for {seconds:.0f} s: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 "
        f"{result.p99_ms:.2f} ms. py-spy at 250 Hz over every thread and worker: {total} busy samples; "
        f"{idle} samples of threads waiting for work (epoll, an empty executor queue) are left out. "
        "The sampler itself costs some throughput.",
        "",
        "Samples by thread kind:",
        "",
        *[f"- {kind}: {100 * n / total:.1f}%" for kind, n in threads.most_common()],
        "",
        "Top functions by own samples (where the CPU is):",
        "",
        "| share | function |",
        "| ---: | --- |",
        *top(own, 30),
        "",
        "Top functions by inclusive samples (what they cost with their callees):",
        "",
        "| share | function |",
        "| ---: | --- |",
        *top(incl, 45),
        "",
    ])


# Leaf frames of a thread that is waiting, not working (py-spy's own idle detection misses these here).
IDLE_LEAVES = frozenset({"thread.py:_worker", "selectors.py:EpollSelector.select", "threading.py:Condition.wait",
                         "queue.py:Queue.get", "threading.py:Thread._wait_for_tstate_lock"})


def _short(frame: str) -> str:
    """'lookup (cachingproxy/store.py:231)' -> 'store.py:lookup'; line numbers dropped so lines aggregate."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{Path(path).name}:{name}" if path else name


def _thread_kind(code: list[str]) -> str:
    joined = ";".join(code)
    if "thread.py:_worker" in joined:
        return "executor threads (store I/O, diskcache)"
    if "run_forever" in joined or "run_until_complete" in joined:
        return "event loop thread"
    return "other"


if __name__ == "__main__":
    raise SystemExit(main())

"""What each lever of a cheap hit buys (issue 16): hot small hits through the ordinary aiohttp path, through
fasthit.py, and through fasthit.py without an access log, beside the bare aiohttp handler, in one run.

    .venv/bin/python benchmarks/hit_levers.py [--workers 2] [--rounds 5] [--seconds 4] [--connections 32]

Same corpus, moto, shim and wrk rotation as `make bench` (benchmarks/run.py), each proxy with its own cache:
`ordinary` = `[server] fast_hits = false`; `fast` = the default; `fast, no log` = also `access_log = "off"`;
`hello` = benchmarks/hello.py. Every proxy is warmed and its variants made before anything is timed. Rounds
alternate the servers; besides requests/s and latency, each server's CPU time (user + system of its process
tree) per request, which a busy machine moves far less than it moves the rates. Prints one table and writes
it to benchmarks/results/hit-levers.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import corpus as corpus_mod
from measure import WrkResult, run_wrk
from run import (
    MOUNT,
    PY,
    RESULTS,
    VARIANTS_WAIT,
    Target,
    env_for_proxy,
    log,
    machine_facts,
    running,
    start_seeded,
    wait_for_variants,
    warm,
)
from targets import HOST, Proc, free_port, proxy_toml, start, tree_cpu_seconds, wait_http, which

LEVERS = {  # target name -> ([server] lines, column heading)
    "ordinary": ("fast_hits = false", "ordinary path"),
    "fast": ("", "fast hits"),
    "fast-nolog": ('access_log = "off"', "fast hits, no access log"),
}


def start_proxy(t: Target, tmp: Path, shim_url: str, workers: int, server_extra: str) -> None:
    t.port = free_port()
    t.base = f"http://{HOST}:{t.port}"
    home = tmp / t.name
    home.mkdir()
    toml = home / "bench.toml"
    toml.write_text(proxy_toml(t.port, shim_url, corpus_mod.BUCKET, home / "cache", workers,
                               server_extra=server_extra))
    # The access log goes where `cachingproxy serve` puts it in production, a file: start() keeps stderr.
    t.proc = start(t.name, [PY, "-m", "cachingproxy", "serve", "--config", str(toml)], tmp, env=env_for_proxy())
    wait_http(t.base + MOUNT + "__ready__", t.proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "hit-levers.md")
    args = parser.parse_args()
    if which("wrk") is None:
        print("benchmarks: wrk is required (benchmarks/setup.sh installs it)", file=sys.stderr)
        return 2
    began = time.monotonic()
    targets = [Target(name, label) for name, (_, label) in LEVERS.items()] + [Target("hello", "bare aiohttp")]
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="cachingproxy-levers-") as tmp_name, running(procs):
        tmp = Path(tmp_name)
        c, objects = corpus_mod.make_corpus()
        shim_url = start_seeded(tmp, procs, c, objects)
        for t in targets:
            if t.name == "hello":
                t.port = free_port()
                t.base = f"http://{HOST}:{t.port}"
                t.proc = start(t.name, [PY, str(Path(__file__).parent / "hello.py"), "--port", str(t.port),
                                        "--workers", str(args.workers)], tmp)
                wait_http(t.base + MOUNT + "x", t.proc)
            else:
                start_proxy(t, tmp, shim_url, args.workers, LEVERS[t.name][0])
            assert t.proc is not None
            procs.append(t.proc)
        for t in targets[:-1]:
            log(f"warming {t.label}")
            warm(t, c, tmp)
            wait_for_variants(t, c.hot, time.monotonic() + VARIANTS_WAIT)
            # Variants written meanwhile make each worker re-read its entries once: one more pass brings
            # every hot entry back into memory before anything is timed.
            run_wrk(t.base, [MOUNT + k for k in c.hot], tmp, seconds=2, connections=args.connections)
        runs: dict[str, list[WrkResult]] = collections.defaultdict(list)
        cpu: collections.Counter[str] = collections.Counter()
        hot = [MOUNT + k for k in c.hot]
        for r in range(args.rounds):
            for t in targets if r % 2 == 0 else reversed(targets):
                assert t.proc is not None
                before = tree_cpu_seconds(t.proc.pid)
                runs[t.name].append(run_wrk(t.base, hot, tmp, seconds=args.seconds, connections=args.connections))
                cpu[t.name] += tree_cpu_seconds(t.proc.pid) - before
                log(f"  round {r + 1}/{args.rounds} {t.label}: {runs[t.name][-1].rps:,.0f} req/s")
    command = ("python benchmarks/hit_levers.py " + " ".join(sys.argv[1:])).strip()
    text = report(targets, runs, cpu, args, command, time.monotonic() - began)
    print(text)
    args.out.write_text(text)
    return 0


def report(targets: list[Target], runs: dict[str, list[WrkResult]], cpu: collections.Counter[str],
           args: argparse.Namespace, command: str, elapsed: float) -> str:
    hello = runs["hello"]
    hello_rps = sum(r.requests for r in hello) / sum(r.seconds for r in hello)
    hello_cpu = 1e6 * cpu["hello"] / sum(r.requests for r in hello)
    lines = [
        "# A cheap hit: what each lever buys",
        "",
        f"Command: `{command}` ({elapsed:.0f} s). Hot small objects ({len(corpus_mod.make_corpus()[0].hot)} "
        f"of 2-30 KB, wrk -t2 -c{args.connections}), {args.workers} workers each, {args.rounds} rounds of "
        f"{args.seconds:.0f} s alternating the servers; rates over all rounds, latency of the median round; "
        "CPU = user + system time of the server's process tree per request.",
        "",
        "| server | requests/s | vs bare aiohttp | p50 / p99 ms | CPU µs per hit | CPU vs bare aiohttp |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for t in targets:
        done = runs[t.name]
        rps = sum(r.requests for r in done) / sum(r.seconds for r in done)
        per_hit = 1e6 * cpu[t.name] / sum(r.requests for r in done)
        p50, p99 = statistics.median(r.p50_ms for r in done), statistics.median(r.p99_ms for r in done)
        lines.append(f"| {t.label} | {rps:,.0f} | {rps / hello_rps:.2f}x | {p50:.2f} / {p99:.2f} | {per_hit:.1f} | "
                     f"{hello_cpu / per_hit:.2f}x |")
    lines += ["", "Rounds, requests/s:", ""]
    for t in targets:
        lines.append(f"- {t.label}: " + ", ".join(f"{r.rps:,.0f}" for r in runs[t.name]))
    lines += ["", "Machine:", "", *machine_facts(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

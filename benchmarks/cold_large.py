"""Cold 100 MB through the proxy against the direct fetch, repeated: the one row of `make bench` (issue 16,
"cold large objects at wire speed") without the rest of the run, so each lever can be measured in a minute.

    .venv/bin/python benchmarks/cold_large.py [--runs 7] [--workers 2] [--size-mb 100] [--delay 0.030]
    .venv/bin/python benchmarks/cold_large.py --versions before=main,after=HEAD   # levers side by side

Starts, on 127.0.0.1 only, the same pieces as benchmarks/run.py: moto's server, the shim adding `--delay` to
every S3 request, and the proxy as `cachingproxy serve` with `[server] workers = N`. One warm-up GET of a
small object first (botocore loads its service model on the first call; run.py's cold 100 MB row comes after
its cold views too). Then, per run: a direct GET of the 100 MB object through the shim, the admin API's purge
of that key, and a GET through the proxy, timed to the last byte on a keep-alive connection. Each run's ratio
is proxy / direct of the same run, since the 2-core machine is shared and runs drift; every run is printed,
then the median. With --versions, one proxy per commit, each timed in turn against its own direct fetch in
every run, so that a burst of load elsewhere hits every version alike. The proxy's S3 GETs are counted (one
per cold fetch: a second would be a broken single flight), and its CPU per cold fetch: the whole process
tree's, commit included, and its workers' loop threads' up to the last byte (the steadier figure on a
loaded box, since the loop is the stage that sets the pace).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from measure import Fetcher
from targets import HOST, Proc, free_port, proxy_toml, start, stop, tree_pids, wait_http

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BUCKET = "cold-large"
KEY = "big/cold-100mb.bin"
TOKEN = "cold-large-bench-token-0123456789"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"})
    return env


def _shim_gets(shim_url: str, reset: bool = False) -> int:
    req = urllib.request.Request(shim_url + ("/__shim__/reset" if reset else "/__shim__/counts"),
                                 method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.load(resp).get("GET", 0))


def _purge(port: int) -> None:
    req = urllib.request.Request(f"http://{HOST}:{port}/_admin/purge", data=json.dumps({"key": KEY}).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def _until_cached(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            conn.request("HEAD", f"/docs/{KEY}")
            resp = conn.getresponse()
            resp.read()
            if resp.getheader("X-Cache") == "HIT":
                return
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError("the cold fetch was not cached")
        time.sleep(0.05)


def _timed(port: int, path: str, size: int) -> tuple[float, float]:
    """(seconds to the last byte, seconds to the response's head) of one GET on a settled connection."""
    fetcher = Fetcher(HOST, port)
    try:
        fetcher.get(path.rsplit("/", 1)[0] + "/small.txt")  # connect and settle, untimed
        status, got, seconds = fetcher.get(path)
    finally:
        fetcher.close()
    if status != 200 or got != size:
        raise RuntimeError(f"GET {path}: {status} with {got} bytes, expected 200 with {size}")
    return seconds, fetcher.first_byte


def _cpu_seconds(root: int) -> float:
    """User + system CPU of a process tree so far (proc(5) stat fields 14 and 15), in seconds."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _loop_seconds(root: int) -> float:
    """CPU of the workers' main threads (their event loops) so far, in seconds, to the nanosecond (the first
    field of /proc/<pid>/task/<pid>/schedstat; the clock ticks above are 10 ms). Under the shared box's load
    the loop thread is the stage of the pipeline that sets the pace, so this is the figure a lever moves."""
    total = 0
    for pid in tree_pids(root):
        if pid == root:
            continue  # the supervisor: no body passes through it
        try:
            total += int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])
        except OSError:
            continue
    return total / 1e9


def _spy(pid: int, out: Path, tmp: Path, run: int) -> subprocess.Popen[bytes]:
    """py-spy sampling the proxy tree until SIGINT; raw folded stacks, merged into `out` at the end."""
    spy = subprocess.Popen([str(Path(PY).with_name("py-spy")), "record", "--pid", str(pid), "--subprocesses",
                            "--threads", "--rate", "250", "--format", "raw",
                            "--output", str(tmp / f"spy-{run}.txt")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches to each process before sampling
    return spy


def _merge_profiles(tmp: Path, out: Path) -> None:
    lines = [line for f in sorted(tmp.glob("spy-*.txt")) for line in f.read_text().splitlines()]
    out.write_text("\n".join(lines) + "\n")
    print(f"folded stacks of every run in {out} (flamegraph.pl or speedscope.app reads them)")


@dataclass
class Version:
    """One proxy under test: the working tree, or a commit exported to a directory of its own."""

    name: str
    source: Path  # the directory `python -m cachingproxy` runs in (its cachingproxy/ is the one imported)
    port: int = 0
    proc: Proc | None = None
    ratios: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # the proxy tree's CPU seconds per cold fetch
    loop: list[float] = field(default_factory=list)  # the workers' loop threads' CPU seconds, to the last byte


def _versions(spec: str, tmp: Path) -> list[Version]:
    if not spec:
        return [Version("proxy", ROOT)]
    out = []
    for item in spec.split(","):
        name, _, commit = item.partition("=")
        source = tmp / f"src-{name}"
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit or name, "cachingproxy"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        out.append(Version(name, source))
    return out


def _start_proxy(v: Version, tmp: Path, shim_url: str, workers: int) -> None:
    v.port = free_port()
    home = tmp / f"proxy-{v.name}"
    home.mkdir()
    toml = home / "proxy.toml"
    toml.write_text(proxy_toml(v.port, shim_url, BUCKET, home / "cache", workers) + f'\n[admin]\ntoken = "{TOKEN}"\n')
    log = tmp / f"proxy-{v.name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen([PY, "-m", "cachingproxy", "serve", "--config", str(toml)], stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(), cwd=v.source,
                                 start_new_session=True)
    v.proc = Proc(f"proxy-{v.name}", popen, log)
    wait_http(f"http://{HOST}:{v.port}/docs/__ready__", v.proc)
    # Warm every worker's S3 client (the kernel spreads connections over the workers' sockets).
    for _ in range(4 * workers):
        _timed(v.port, "/docs/big/small.txt", 5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size-mb", type=int, default=100, help="MiB, as the 100 MB row of run.py")
    parser.add_argument("--delay", type=float, default=0.030, help="the shim's delay per S3 request")
    parser.add_argument("--no-checksum", action="store_true",
                        help="upload without a flexible checksum (as before 2025), so the proxy verifies the MD5")
    parser.add_argument("--versions", default="", metavar="NAME=COMMIT,...",
                        help="proxies built from these commits (git archive), each beside the same direct fetch "
                             "in every run, in turn; default: the working tree alone")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="folded stacks from py-spy (in the venv) over the proxy's processes and threads, "
                             "during the proxied GETs only")
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="cachingproxy-cold-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            versions = _versions(args.versions, tmp)
            moto_port = free_port()
            procs.append(start("moto", [PY, "-m", "moto.server", "-H", HOST, "-p", str(moto_port)], tmp))
            moto_url = f"http://{HOST}:{moto_port}"
            wait_http(moto_url + "/moto-api/", procs[-1])
            import boto3  # the test extra; only the seeding needs it
            from botocore.config import Config

            s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing", config=Config(
                                  request_checksum_calculation="when_required" if args.no_checksum else None))
            s3.create_bucket(Bucket=BUCKET)
            s3.put_object(Bucket=BUCKET, Key="big/small.txt", Body=b"warm\n", ACL="public-read")
            s3.put_object(Bucket=BUCKET, Key=KEY, Body=os.urandom(size), ACL="public-read",
                          ContentType="application/octet-stream")
            shim_port = free_port()
            procs.append(start("shim", [PY, str(HERE / "shim.py"), "--port", str(shim_port), "--upstream", moto_url,
                                        "--delay", str(args.delay)], tmp))
            shim_url = f"http://{HOST}:{shim_port}"
            wait_http(shim_url + "/__shim__/counts", procs[-1])
            for v in versions:
                try:
                    _start_proxy(v, tmp, shim_url, args.workers)
                finally:
                    if v.proc is not None:
                        procs.append(v.proc)
            print(f"cold {args.size_mb} MiB, seconds to last byte; shim delay {args.delay * 1000:.0f} ms; "
                  f"workers {args.workers}; {'MD5' if args.no_checksum else 'CRC32'} check; "
                  f"load average {os.getloadavg()[0]:.1f}")
            for run in range(1, args.runs + 1):
                for v in versions:
                    assert v.proc is not None
                    direct, direct_head = _timed(shim_port, f"/{BUCKET}/{KEY}", size)
                    _purge(v.port)
                    _shim_gets(shim_url, reset=True)
                    spy = _spy(v.proc.pid, args.profile, tmp, run) if args.profile else None
                    cpu, loop = _cpu_seconds(v.proc.pid), _loop_seconds(v.proc.pid)
                    proxied, proxied_head = _timed(v.port, f"/docs/{KEY}", size)
                    v.loop.append(_loop_seconds(v.proc.pid) - loop)
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(60)
                    gets = _shim_gets(shim_url)
                    _until_cached(v.port)  # the commit may end after the response: purge only what it indexed
                    v.cpu.append(_cpu_seconds(v.proc.pid) - cpu)  # the whole fill, commit included
                    v.ratios.append(proxied / direct)
                    print(f"  run {run} {v.name}: direct {direct:.3f} s (head {direct_head * 1000:.0f} ms), "
                          f"proxy {proxied:.3f} s (head {proxied_head * 1000:.0f} ms), "
                          f"{proxied / direct:.2f}x direct, proxy CPU {v.cpu[-1]:.2f} s (loop {v.loop[-1]:.3f} s), "
                          f"S3 GETs {gets}, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            for v in versions:
                print(f"{v.name}: median {statistics.median(v.ratios):.2f}x direct; all: "
                      + ", ".join(f"{r:.2f}" for r in v.ratios)
                      + f"; proxy CPU per cold fetch, median {statistics.median(v.cpu):.2f} s"
                      + f" (loop thread to the last byte {statistics.median(v.loop):.3f} s)")
            if args.profile:
                _merge_profiles(tmp, args.profile)
        finally:
            for proc in reversed(procs):
                stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

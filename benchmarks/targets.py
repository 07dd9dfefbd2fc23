"""Processes the benchmark starts (moto, the shim, the proxy, nginx) and how it watches them.

Everything listens on 127.0.0.1 only. Each process gets its own session (process group), so that `stop()`
can always end what it started, and nothing else, even when a supervisor leaves children behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "HOST",
    "Proc",
    "TreeMemory",
    "free_port",
    "nginx_conf",
    "proxy_toml",
    "start",
    "stop",
    "tree_cpu_seconds",
    "wait_http",
]

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        code = self.popen.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {code}; log tail:\n{tail}")


def start(name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> Proc:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=ROOT, start_new_session=True)
    return Proc(name, popen, log)


def stop(proc: Proc, timeout: float = 15.0) -> int | None:
    """SIGTERM to the process itself (a supervisor must forward it), then SIGKILL to its group if needed."""
    if proc.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  {proc.name} ignored SIGTERM for {timeout:.0f}s: killing it", file=sys.stderr)
    # The group is ours (start_new_session): this ends children a crashed supervisor left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(5)
    return proc.popen.returncode


def wait_http(url: str, proc: Proc, timeout: float = 60.0) -> None:
    """Until `url` answers at all (any status), or `proc` dies, or `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        proc.check()
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer, whatever the status: the server is up
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not answer {url} within {timeout:.0f}s") from None
            time.sleep(0.1)


# -- memory of a process tree ---------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: parse after the last ')'.
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(root: int) -> list[int]:
    tree = _children()
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    return pids


def tree_cpu_seconds(root: int) -> float:
    """User plus system CPU seconds so far of a process and its living descendants (/proc/<pid>/stat).

    Per hit, this is the cost a rate hides when other work shares the cores: the figure the issue's profile
    table is in. Workers live for the whole run, so none of their time is lost with an exited child."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def _kib(path: str, field_name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class TreeMemory:
    """Samples the summed RSS (and PSS) of a process and all its descendants from /proc, keeping the peak.

    RSS counts pages shared between forked workers once per process, so its sum overstates; PSS splits shared
    pages fairly, so its sum is what the tree really costs: the headline and the target (issue 16), RSS beside it.
    """

    root: int
    interval: float = 0.02
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = tree_pids(self.root)
        rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
        pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


# -- configs ----------------------------------------------------------------------------------------------


def proxy_toml(port: int, shim_url: str, bucket: str, cache_dir: Path, workers: int, sites: int = 1,
               server_extra: str = "") -> str:
    """The proxy's config. With `sites` > 1 the real site is the last of that many [[sites]]: the others are
    decoys on any host whose mounts ("/docs0", "/docs1"...) sort before "/docs", so every request's routing
    scans all of them before it matches (the worst case for routing.py)."""
    decoys = "".join(f'\n[[sites]]\nname = "decoy{i}"\nmount = "/docs{i}"\n' for i in range(sites - 1))
    real = '\n[[sites]]\nname = "docs"\nmount = "/docs"\n' if sites > 1 else ""
    return _PROXY_TOML.format(host=HOST, port=port, workers=workers, bucket=bucket, shim_url=shim_url,
                              cache_dir=cache_dir, server_extra=server_extra) + decoys + real


_PROXY_TOML = """\
[server]
host = "{host}"
port = {port}
mount = "/docs"
shutdown_timeout = 5.0
workers = {workers}
{server_extra}

[s3]
bucket = "{bucket}"
endpoint_url = "{shim_url}"
addressing_style = "path"
region = "us-east-1"
read_timeout = 30.0
request_timeout = 60.0
max_connections = 64

[cache]
directory = "{cache_dir}"
size_limit_mb = 4096
ttl = 3600.0
"""


# What nginx gzips beside text/html (always on): the corpus's other text types (corpus.py), as the proxy does.
NGINX_GZIP_TYPES = ("text/css", "text/javascript", "application/javascript")


def nginx_conf(prefix: Path, port: int, shim_port: int, bucket: str) -> str:
    """nginx as an expert would put it in front of a bucket: proxy_cache with lock, revalidation and sendfile,
    and gzip at level 6 (nginx has no brotli without a third-party module, so run.py asks it for gzip where it
    asks the proxy for br). nginx compresses on every response, after the cache; the proxy once per version."""
    user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the temp dirs the benchmark made
    return f"""\
{user}
daemon off;
master_process on;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {prefix}/access.log combined buffer=64k flush=1s;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    gzip on;
    gzip_comp_level 6;
    gzip_min_length 1024;
    gzip_types {" ".join(NGINX_GZIP_TYPES)};
    gzip_vary on;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=docs:16m max_size=4g inactive=60m use_temp_path=off;
    upstream s3 {{
        server {HOST}:{shim_port};
        keepalive 64;
    }}
    server {{
        listen {HOST}:{port} reuseport;
        location /docs/ {{
            proxy_pass http://s3/{bucket}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {HOST}:{shim_port};
            proxy_cache docs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 60m;
            proxy_cache_lock on;
            proxy_cache_revalidate on;
            proxy_cache_use_stale error timeout updating;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"""


def which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)

"""Load and timing tools for the benchmark: wrk runs parsed from rotate.lua's summary, and timed single fetches."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fetcher", "WrkResult", "encodings", "fetch_all", "run_wrk"]

HERE = Path(__file__).resolve().parent
LUA = HERE / "rotate.lua"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def bytes_per_request(self) -> float:
        """Head and body as wrk read them: shows which coding a run was really answered in."""
        return self.bytes / self.requests if self.requests else 0.0


def run_wrk(base: str, paths: list[str], workdir: Path, *, seconds: float, connections: int, threads: int = 2,
            timeout: float = 10.0, headers: dict[str, str] | None = None) -> WrkResult:
    """wrk against `base` rotating over `paths`; bounded by `seconds` plus wrk's own `timeout`. `headers` go on
    every request (wrk -H; rotate.lua's wrk.format keeps them)."""
    paths_file = workdir / f"paths-{abs(hash(tuple(paths)))}.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:.0f}s", f"--timeout={timeout:.0f}s", *extra,
            "-s", str(LUA), base, "--", str(paths_file)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout + 30, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    errors = sum(int(raw[k]) for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return WrkResult(requests=int(raw["requests"]), seconds=raw["duration_us"] / 1e6, bytes=int(raw["bytes"]),
                     errors=errors, p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000)


class Fetcher:
    """One keep-alive HTTP/1.1 connection, used sequentially; times each GET to its last byte."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._conn = http.client.HTTPConnection(host, port, timeout=120)
        self._buf = memoryview(bytearray(1 << 20))
        self.first_byte = 0.0  # seconds from the request to the response's head, of the last get

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, int, float]:
        """(status, body bytes, seconds); the body is read and discarded."""
        status, size, seconds, _ = self.get_coded(path, headers)
        return status, size, seconds

    def get_coded(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, int, float, str]:
        """get() and the response's Content-Encoding ("identity" when absent)."""
        for attempt in (1, 2):
            start = time.perf_counter()
            try:
                self._conn.request("GET", path, headers=headers or {})
                resp = self._conn.getresponse()
                self.first_byte = time.perf_counter() - start
                total = 0
                while n := resp.readinto(self._buf):
                    total += n
                coding = resp.getheader("Content-Encoding") or "identity"
                return resp.status, total, time.perf_counter() - start, coding
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # An idle keep-alive connection closed by the server: reconnect once, untimed.
                self._conn.close()
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=120)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()


def fetch_all(host: str, port: int, paths: list[str], concurrency: int = 16) -> list[int]:
    """GET each path once (warm-up); returns the statuses."""
    def worker(chunk: list[str]) -> list[int]:
        f = Fetcher(host, port)
        try:
            return [f.get(p)[0] for p in chunk]
        finally:
            f.close()

    chunks = [paths[i::concurrency] for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        return [status for result in pool.map(worker, chunks) for status in result]


def encodings(host: str, port: int, paths: list[str], headers: dict[str, str],
              concurrency: int = 16) -> dict[str, list[str]]:
    """GET each path once per connection of `concurrency` new ones, with `headers`: {path: the Content-Encoding
    of each answer} (a non-200 answer counts as "status <n>"). New connections each call, so that with several
    workers every worker is asked over a few calls."""
    def worker(conn: int) -> list[tuple[str, str]]:
        f = Fetcher(host, port)
        try:
            out = []
            for i in range(len(paths)):
                path = paths[(i + conn * 7) % len(paths)]
                status, _, _, coding = f.get_coded(path, headers)
                out.append((path, coding if status == 200 else f"status {status}"))
            return out
        finally:
            f.close()

    seen: dict[str, list[str]] = {p: [] for p in paths}
    with ThreadPoolExecutor(concurrency) as pool:
        for result in pool.map(worker, range(concurrency)):
            for path, coding in result:
                seen[path].append(coding)
    return seen

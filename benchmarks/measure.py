"""Load and timing tools for the benchmark: wrk runs parsed from rotate.lua's summary, and timed single fetches."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fetcher", "WrkResult", "fetch_all", "run_wrk"]

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


def run_wrk(base: str, paths: list[str], workdir: Path, *, seconds: float, connections: int, threads: int = 2,
            timeout: float = 10.0) -> WrkResult:
    """wrk against `base` rotating over `paths`; bounded by `seconds` plus wrk's own `timeout`."""
    paths_file = workdir / f"paths-{abs(hash(tuple(paths)))}.txt"
    paths_file.write_text("\n".join(paths) + "\n")
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:.0f}s", f"--timeout={timeout:.0f}s",
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

    def get(self, path: str) -> tuple[int, int, float]:
        """(status, body bytes, seconds); the body is read and discarded."""
        for attempt in (1, 2):
            start = time.perf_counter()
            try:
                self._conn.request("GET", path)
                resp = self._conn.getresponse()
                total = 0
                while n := resp.readinto(self._buf):
                    total += n
                return resp.status, total, time.perf_counter() - start
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

"""Issue 16, a smaller footprint: where the proxy's resident memory is, per process, from /proc.

    .venv/bin/python benchmarks/footprint.py [--workers 2] [--seconds 8] [--maps 12]

Starts what `benchmarks/run.py` starts for its `workers` column (moto, the 30 ms shim, `cachingproxy serve`
with `[server] workers = N`, the same corpus) and prints, for each process of the proxy's tree, its
smaps_rollup (Pss, and Pss split into anonymous and file-backed; Private_Dirty: the bytes this process alone
owns and wrote) at three moments: started (the banner printed), warm (300 small objects, the 10 MB one and
2 s of wrk), and at the peak of the tree's Pss while 32 clients pull the cold 100 MB object with wrk (the
"peak RSS MiB, 32 clients x 100 MB" row of run.py). Then the biggest mappings by Pss at that peak, so the
heap, the interpreter, the shared libraries and the mapped cache files can be told apart.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpus_mod  # the same directory: scripts, not a package
import run
from measure import run_wrk
from targets import tree_pids

__all__ = ["Rollup", "rollup", "tree_pss_kib"]

FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


@dataclass(frozen=True)
class Rollup:
    pid: int
    name: str
    kib: dict[str, int]


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup as {field: KiB}; empty when the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in FIELDS:
                    out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


def tree_pss_kib(root: int) -> int:
    return sum(rollup(p).get("Pss", 0) for p in tree_pids(root))


def tree_rollups(root: int) -> list[Rollup]:
    return [Rollup(p, "supervisor" if p == root else "worker", rollup(p)) for p in sorted(tree_pids(root))]


def mappings(pid: int) -> collections.Counter[str]:
    """Pss per mapping name (heap, [anon], a .so, a cache file...), in KiB."""
    by: collections.Counter[str] = collections.Counter()
    current = "?"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                    current = head[5].strip() if len(head) == 6 else "[anon]"
                    if current.startswith("/"):
                        current = "/".join(current.rsplit("/", 2)[-2:])
                elif head[0] == "Pss:":
                    by[current] += int(head[1])
    except OSError:
        pass
    return by


@dataclass
class PeakWatch:
    """Samples the tree's rollups every `interval`; keeps the sample with the largest summed Pss, and the smaps
    of each process at the largest of the (slower) mapping samples."""

    root: int
    interval: float = 0.05
    peak: list[Rollup] = field(default_factory=list)
    peak_pss: int = 0
    maps: dict[int, collections.Counter[str]] = field(default_factory=dict)
    maps_pss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        last_maps = 0.0
        while not self._stop.wait(self.interval):
            rows = tree_rollups(self.root)
            total = sum(r.kib.get("Pss", 0) for r in rows)
            if total > self.peak_pss:
                self.peak_pss, self.peak = total, rows
            if time.monotonic() - last_maps > 0.5 and total >= self.maps_pss:
                self.maps_pss = total
                self.maps = {r.pid: mappings(r.pid) for r in rows}
                last_maps = time.monotonic()

    def __enter__(self) -> PeakWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def table(title: str, rows: list[Rollup]) -> list[str]:
    lines = [f"### {title}: tree Pss {sum(r.kib.get('Pss', 0) for r in rows) / 1024:.1f} MiB", "",
             "| process | " + " | ".join(f"{f} MiB" for f in FIELDS) + " |",
             "| --- |" + " ---: |" * len(FIELDS)]
    for r in rows:
        lines.append(f"| {r.pid} {r.name} | " + " | ".join(f"{r.kib.get(f, 0) / 1024:.1f}" for f in FIELDS) + " |")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the 32 x 100 MB wrk run")
    parser.add_argument("--maps", type=int, default=12, help="mappings listed per process at the peak")
    args = parser.parse_args()
    procs: list[run.Proc] = []
    with tempfile.TemporaryDirectory(prefix="cachingproxy-footprint-") as tmp_name, run.running(procs):
        tmp = Path(tmp_name)
        c, objects = corpus_mod.make_corpus()
        shim_url = run.start_seeded(tmp, procs, c, objects)
        t = run.Target("workers", f"workers x{args.workers}")
        run.start_target(t, tmp, shim_url, int(shim_url.rsplit(":", 1)[1]), args.workers)
        assert t.proc is not None
        procs.append(t.proc)
        root = t.proc.pid
        out = [*table("started", tree_rollups(root))]
        run.warm(t, c, tmp)
        out += table("warm", tree_rollups(root))
        with PeakWatch(root) as watch:
            result = run_wrk(t.base, [run.MOUNT + c.big100_fanout], tmp, seconds=args.seconds, connections=32,
                             timeout=60)
        out += table(f"peak, 32 clients x 100 MB ({result.mb_per_s:,.0f} MB/s, {result.errors} errors)", watch.peak)
        out += table("after", tree_rollups(root))
        out.append(f"### biggest mappings by Pss (MiB) at a sample near the peak (tree {watch.maps_pss / 1024:.1f})")
        out.append("")
        for pid, by in watch.maps.items():
            top = ", ".join(f"{name} {kib / 1024:.1f}" for name, kib in by.most_common(args.maps))
            out.append(f"- {pid}: {top}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

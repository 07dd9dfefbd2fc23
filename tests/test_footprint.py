"""A smaller footprint (issue 16): what the workers need is loaded once, by the zygote that forks them, and the
workers keep sharing it, while the supervisor stays small (footprint.py, spawn.py, origin.share_models)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cachingproxy import origin
from cachingproxy.config import S3Config

from .conftest import Bucket, free_port
from .shim import Shim
from .test_workers import raw_get, serving, write_config


def _rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            out[name] = int(rest.split()[0])
    return out


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_clients_opened_after_share_models_parse_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client reads the one loader the supervisor filled, and that loader already held all it needs: a
    client that had to parse more would do so in each worker, privately."""
    monkeypatch.setattr(origin, "_shared", None)  # restored after the test: other tests open clients too
    origin.share_models()
    assert origin._shared is not None
    loader = origin._shared[1]
    loaded = set(loader._cache)
    assert ("load_service_model", "s3", "service-2", "api_version", None) in loaded
    configs = [S3Config(bucket="b", endpoint_url="http://127.0.0.1:9", region="eu-west-1"),
               S3Config(bucket="b", region="us-east-1", addressing_style="virtual")]
    for config in configs:
        async with origin.open_client(config) as client:
            assert client._loader is loader
    assert set(loader._cache) == loaded


def test_preload_imports_what_a_worker_needs_and_freeze_keeps_it_from_collections() -> None:
    """In a fresh interpreter (freezing this one would keep every test's garbage): after preload and freeze,
    the modules a worker imports are there and the collector no longer tracks anything that was alive."""
    script = """
import gc, sys
from cachingproxy import footprint
assert "aiohttp.web" not in sys.modules and "cachingproxy.app" not in sys.modules
footprint.preload()
footprint.freeze()
missing = [m for m in ("aiohttp.web", "cachingproxy.app", "cachingproxy.tls", "aiobotocore.client", "diskcache",
                       "brotli", "zstandard", "uvloop", "botocore.endpoint_provider") if m not in sys.modules]
assert not missing, missing
assert gc.get_freeze_count() > 50_000, gc.get_freeze_count()
assert sum(gc.get_count()) < 1_000, gc.get_count()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "ok", done.stderr


_ARENAS = """
import ctypes, sys, threading
from cachingproxy import footprint
if sys.argv[1] == "limit":
    assert footprint.tune_malloc(2)
go = threading.Barrier(8)
def work():
    kept = [b"x" * 1000 for _ in range(100)]  # above pymalloc's 512 bytes: glibc's malloc, in this thread's arena
    go.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_stats")
@pytest.mark.parametrize(("mode", "most"), [("limit", 2), ("default", 16)])
def test_tune_malloc_bounds_the_arenas_that_threads_make(mode: str, most: int) -> None:
    """Eight threads allocating at once: each gets an arena of its own by default (up to 8 per core), two in all
    once tune_malloc(2) ran; an operator's MALLOC_ARENA_MAX is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, timeout=60,
                          env=env, check=True)
    arenas = sum(line.startswith("Arena ") for line in done.stderr.splitlines())
    assert (arenas <= most) and (mode == "limit" or arenas > 2), done.stderr
    if mode == "limit":
        respected = subprocess.run([sys.executable, "-c", "from cachingproxy import footprint; "
                                    "print(footprint.tune_malloc(2))"], capture_output=True, text=True,
                                   timeout=60, env={**env, "MALLOC_ARENA_MAX": "4"}, check=True)
        assert respected.stdout.strip() == "False"


_FRAGMENTS = """
import sys
from cachingproxy import footprint
if sys.argv[1] == "tuned":
    assert footprint.tune_malloc()
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
big = bytearray(4 << 20)  # glibc maps it; freeing it raises glibc's mmap threshold to 4 MiB
del big
base = rss()
buffers, kept = [], []
for _ in range(64):
    buffers.append(bytearray(512 * 1024))  # 32 MiB of buffers, from the heap once the threshold moved
    kept.append(bytearray(2048))  # and a small allocation that outlives each
buffers.clear()
print(round(rss() - base, 1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_returns_freed_buffers_that_small_allocations_would_pin() -> None:
    """32 MiB of 512 KiB buffers freed after one 4 MiB block: by default they stay resident (the heap cannot
    shrink past the small allocations made after them); tuned, each buffer was its own mapping, gone when freed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    kept = {mode: float(subprocess.run([sys.executable, "-c", _FRAGMENTS, mode], capture_output=True, text=True,
                                       timeout=60, env=env, check=True).stdout)
            for mode in ("default", "tuned")}
    assert kept["default"] > 24 and kept["tuned"] < 4, kept


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc smaps_rollup needed")
async def test_the_supervisor_stays_small_and_the_workers_share_what_their_zygote_loaded(
        tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    """With 2 workers the supervisor never loads aiohttp, uvloop or botocore's session (its PSS was 39 MiB when
    it preloaded them for the workers, 11-12 since: benchmarks/results/footprint.md), the workers are its
    children although a zygote forked them (spawn.py), and after serving they still share what the zygote
    loaded (about 20 MiB of written pages each; under 10 before the preload and the freezes)."""
    bucket.put("page.html", b"<p>hello</p>" * 100)
    port = free_port()
    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=2)) as (proc, _, _):
        for _ in range(20):  # every worker serves (a connection each, spread by the kernel), misses and hits
            await raw_get(port, "/docs/page.html")
        workers = _children(proc.pid)
        assert len(workers) == 2  # adopted; the zygote is gone
        for pid in workers:
            assert "_http_parser" in _maps(pid)  # aiohttp's C parser: a worker has it loaded
            shared = _rollup(pid)["Shared_Dirty"] / 1024
            assert shared > 12, f"worker {pid} shares {shared:.1f} MiB of written pages with its sibling"
        supervisor = _maps(proc.pid)
        assert "_http_parser" not in supervisor and "uvloop" not in supervisor
        pss = _rollup(proc.pid)["Pss"] / 1024
        assert pss < 20, f"the supervisor's PSS is {pss:.1f} MiB"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux /proc maps needed")
async def test_workers_holding_a_hot_body_share_one_copy_of_it(tmp_path: Path, bucket: Bucket, shim: Shim) -> None:
    """A small body a worker keeps in memory is a read-only mapping of its cache file (hot.held), so every worker
    holding it maps the same file: one copy in the page cache, where each worker used to read its own into
    bytes (300 hot pages: 9 MiB of identical bytes with 2 workers, benchmarks/results/footprint.md)."""
    bucket.put("page.html", b"<p>shared</p>" * 1500)  # 19.5 KB: held in memory (hot.HOT_BODY_MAX)
    port = free_port()
    async with serving(write_config(tmp_path, port, shim.url, bucket.name, workers=2)) as (proc, _, _):
        for _ in range(24):  # each worker serves it from the cache at least twice (the kernel spreads connections)
            assert (await raw_get(port, "/docs/page.html"))[1] == b"<p>shared</p>" * 1500
        cache = str(tmp_path / "cache")
        mapped = []
        for pid in _children(proc.pid):
            # The inode of each body file it maps (not the index, its WAL's shared memory or the stamp).
            mapped.append({line.split()[4] for line in _maps(pid).splitlines()
                           if cache in line and line.rstrip().endswith(".val")})
        assert len(mapped) == 2 and mapped[0] & mapped[1], mapped
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


def test_a_body_under_a_page_stays_bytes_and_a_mapping_costs_whole_pages(tmp_path: Path) -> None:
    """A mapping takes whole pages and one of the kernel's limited mappings (vm.max_map_count): a hot body
    smaller than a page is kept as the bytes read, and the budget counts a mapped one in pages, or a budget of
    16 MiB of 100-byte bodies would have asked for 160,000 mappings."""
    import mmap

    from cachingproxy import hot

    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"s" * 100)
    large.write_bytes(b"L" * (mmap.PAGESIZE + 1))
    with small.open("rb") as f:
        kept = hot.held(f, f.read())
    assert isinstance(kept, bytes) and kept == b"s" * 100 and hot._cost(kept) == 100
    with large.open("rb") as f:
        kept = hot.held(f, f.read())
    assert isinstance(kept, memoryview) and kept == b"L" * (mmap.PAGESIZE + 1)
    assert hot._cost(kept) == 2 * mmap.PAGESIZE
